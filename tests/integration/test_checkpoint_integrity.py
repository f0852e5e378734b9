"""Checkpoints and outputs on real ranks (issue 13, items 9 to 13): no save runs under an old completion marker, a
rollback sets the checkpoints it abandons aside, markers vouch for every file, consolidation never overlaps the
checkpoint it reads and syncs before its rename, and what the launcher writes follows the umask."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest

from launcher import checkpoints
from launcher.consolidate import consolidate
from tests.helpers import STEPS, assert_rejected, cli, complete_steps, launch, on_import, smoke_recipe

pytestmark = pytest.mark.integration

# Loaded into every rank (sitecustomize on PYTHONPATH): as each save begins, the rank logs the step and whether the
# checkpoint it is about to write into carries a completion marker. Test-only.
SPY = on_import("transformers.trainer", '''
    save = module.Trainer._save_checkpoint
    def spied(self, model, trial):
        step = self.state.global_step
        marker = os.path.join(self.args.output_dir, f"checkpoint-{step}", "complete.json")
        with open(os.environ["SAVES_LOG"], "a") as f:
            f.write(f"rank {os.environ['RANK']} step {step} marker {os.path.exists(marker)}\\n")
        return save(self, model, trial)
    module.Trainer._save_checkpoint = spied
''')


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A 2-rank run of 12 steps saved every 4 (three kept) and consolidated, under umask 022; read only."""
    tmp = tmp_path_factory.mktemp("finished")
    old = os.umask(0o022)
    try:
        launch(smoke_recipe(tmp, training={**STEPS, "max_steps": 12, "save_total_limit": 3}), "--nproc_per_node", 2)
    finally:
        os.umask(old)
    assert complete_steps(tmp / "run") == [4, 8, 12]
    return tmp / "run"


def test_a_step_saved_twice_is_never_written_under_its_old_marker(tmp_path):
    """A stop request under save_strategy epoch saves step 1 at the stop and again at the epoch's end, into the same
    checkpoint-1: the second save must not start while the first save's marker still says complete."""
    spy, stop = tmp_path / "spy", tmp_path / "stop"
    spy.mkdir()
    (spy / "sitecustomize.py").write_text(SPY)
    stop.touch()
    recipe = smoke_recipe(tmp_path, training={**STEPS, "save_strategy": "epoch"})
    env = {"PYTHONPATH": str(spy), "SAVES_LOG": str(tmp_path / "saves"), "LAUNCHER_STOP_FILE": str(stop)}
    result, _ = launch(recipe, "--nproc_per_node", 2, env=env)
    assert "stop requested: saving a checkpoint at step 1" in result.stdout
    saves = sorted((tmp_path / "saves").read_text().splitlines())
    assert saves == [f"rank {r} step 1 marker False" for r in (0, 0, 1, 1)], saves
    checkpoint = tmp_path / "run" / "checkpoints" / "checkpoint-1"
    assert complete_steps(tmp_path / "run") == [1]
    assert checkpoints.marker(checkpoint)["files"] == checkpoints.files(checkpoint)  # rewritten after the save


def test_a_rollback_sets_the_abandoned_checkpoints_aside(tmp_path):
    """Rolled back to checkpoint-4 of 4, 8, 12 and stopped at step 5: retention must keep 4 and 5 (it kept 8 and 12 of
    the abandoned continuation), and the requeued job continues from 5, not from the old 12 ('finished')."""
    recipe = smoke_recipe(tmp_path, training={**STEPS, "max_steps": 12, "save_total_limit": 3})
    run = tmp_path / "run"
    launch(recipe, "--nproc_per_node", 2)
    assert complete_steps(run) == [4, 8, 12]
    (tmp_path / "stop").touch()
    result, _ = launch(recipe, "--nproc_per_node", 2, "--resume", run / "checkpoints" / "checkpoint-4",
                       env={"LAUNCHER_STOP_FILE": str(tmp_path / "stop")})
    assert complete_steps(run) == [4, 5]
    assert "rolled back to step 4: moved checkpoint-8" in result.stdout
    assert sorted(p.name.rsplit("-", 2)[0] for p in (run / "rolled-back").iterdir()) == ["checkpoint-12",
                                                                                        "checkpoint-8"]
    assert checkpoints.resume_point(run, "auto", requeued=True) == run / "checkpoints" / "checkpoint-5"


def test_resume_refuses_a_checkpoint_whose_files_changed_after_it_was_marked(finished_run, tmp_path):
    """DeepSpeed unpickles the shards it resumes from: --resume PATH takes only the files the marker vouches for."""
    copy = tmp_path / "elsewhere" / "checkpoint-8"
    shutil.copytree(finished_run / "checkpoints" / "checkpoint-8", copy)
    shard = next(copy.glob("global_step8/*rank_1_*optim_states.pt"))
    shard.write_bytes(shard.read_bytes()[:1000])
    recipe = smoke_recipe(tmp_path, training={**STEPS, "max_steps": 12})
    assert_rejected(cli("launch", recipe, "--nproc_per_node", 2, "--resume", copy), str(copy),
                    f"{shard.relative_to(copy)} has 1000 bytes")
    assert not (tmp_path / "run").exists()


def test_outputs_follow_the_umask(finished_run):
    """final/ was a 0700 mkdtemp and run files 0600 mkstemps: nobody else could read the model."""
    assert mode(finished_run / "final") == 0o755
    for path in (finished_run / "final").rglob("*"):
        assert mode(path) == (0o755 if path.is_dir() else 0o644), path
    for name in ("recipe.yaml", "ds_config.json", "command.txt", "environment.json", "ranks/rank0.json",
                 "ranks/rank1.json", "checkpoints/checkpoint-12/complete.json"):
        assert mode(finished_run / name) == 0o644, name


def test_consolidate_never_replaces_its_own_checkpoints_and_follows_a_symlinked_output(finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run / "checkpoints", run / "checkpoints")
    (tmp_path / "link").symlink_to(run)
    for output in (run, tmp_path / "link", run / "checkpoints" / "checkpoint-12" / "model"):
        assert_rejected(cli("consolidate", run, output, "--overwrite"), "OUTPUT overlaps")
    assert complete_steps(run) == [4, 8, 12]
    for step in (4, 8, 12):
        checkpoints.verify(run / "checkpoints" / f"checkpoint-{step}")

    served = tmp_path / "served"  # a symlinked OUTPUT: the directory it names is replaced, the link stays
    served.mkdir()
    (served / "old.txt").write_text("old")
    (tmp_path / "model").symlink_to(served)
    result = cli("consolidate", run, tmp_path / "model", "--overwrite")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "model").is_symlink() and not (served / "old.txt").exists()
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "model")


def test_consolidation_syncs_every_file_and_directory_before_its_rename(finished_run, tmp_path, monkeypatch):
    synced, published = [], {}
    fsync, replace = os.fsync, os.replace

    def spy_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        fsync(fd)

    def spy_replace(src, dst):
        if Path(dst) == tmp_path / "model":
            published.update(tree={str(src), *map(str, Path(src).rglob("*"))}, synced=set(synced))
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", spy_fsync)
    monkeypatch.setattr(os, "replace", spy_replace)
    consolidate(str(finished_run), str(tmp_path / "model"), progress=lambda _: None)
    assert len(published["tree"]) > 5 and published["tree"] <= published["synced"]
    assert str(tmp_path) in synced[len(published["synced"]):]  # the rename itself, in the parent directory
