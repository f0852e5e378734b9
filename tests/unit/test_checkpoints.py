"""Retention and resume go by completion markers: never fewer than two complete checkpoints kept, the only complete
one never deleted, half-written ones neither counted nor loaded; a marker vouches for every file's size, and
consolidation never replaces the checkpoints it reads."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from launcher import checkpoints, rundir
from launcher.consolidate import consolidate, resolve_checkpoint
from launcher.errors import RecipeError
from tests.helpers import assert_rejected, cli


def make(run_dir: Path, step: int, complete: bool) -> Path:
    path = checkpoints.directory(run_dir) / f"checkpoint-{step}"
    path.mkdir(parents=True)
    if complete:
        checkpoints.mark_complete(path, {"step": step, "max_steps": 100, "world_size": 2})
    return path


def names(run_dir: Path) -> list[str]:
    return [p.name for p in checkpoints.listing(run_dir)]


def test_retention_keeps_two_complete_checkpoints_whatever_the_limit(tmp_path):
    for step in (10, 20, 30, 40):
        make(tmp_path, step, complete=True)
    removed = checkpoints.retain(tmp_path, 1)
    assert [p.name for p in removed] == ["checkpoint-10", "checkpoint-20"]
    assert names(tmp_path) == ["checkpoint-30", "checkpoint-40"]


def test_retention_never_counts_or_deletes_half_written_checkpoints(tmp_path):
    make(tmp_path, 10, complete=True)
    for step in (20, 30, 40):  # cut short: no marker
        make(tmp_path, step, complete=False)
    assert checkpoints.retain(tmp_path, 1) == []
    assert names(tmp_path) == ["checkpoint-10", "checkpoint-20", "checkpoint-30", "checkpoint-40"]
    assert checkpoints.resume_point(tmp_path, "auto").name == "checkpoint-10"


# --- the marker vouches for the files (issue 13, items 9, 11, 12, 13) ---------------------------------------------

def saved(run_dir: Path, step: int) -> Path:
    """A checkpoint with files of known sizes, marked complete as the worker marks it."""
    path = checkpoints.directory(run_dir) / f"checkpoint-{step}"
    (path / f"global_step{step}").mkdir(parents=True)
    (path / "latest").write_text(f"global_step{step}")
    for rank in (0, 1):
        (path / f"global_step{step}" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"x" * 100)
    checkpoints.mark_complete(path, {"step": step, "max_steps": 100, "world_size": 2})
    return path


SHARD = "global_step10/zero_pp_rank_1_mp_rank_00_optim_states.pt"


def test_the_marker_lists_every_file_with_its_size(tmp_path):
    path = saved(tmp_path, 10)
    assert checkpoints.marker(path)["files"] == {
        "global_step10/zero_pp_rank_0_mp_rank_00_optim_states.pt": 100, SHARD: 100, "latest": 13}
    checkpoints.verify(path)


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_resume_and_consolidation_refuse_files_that_do_not_match_the_marker(tmp_path, damage):
    path = saved(tmp_path, 10)
    shard = path / SHARD
    shard.write_bytes(b"x" * 40) if damage == "truncated" else shard.unlink()
    needle = "has 40 bytes, 100 when it was completed" if damage == "truncated" else "is missing"
    for call in (lambda: checkpoints.resume_point(tmp_path, "auto"),
                 lambda: checkpoints.resume_point(tmp_path, str(path)),  # --resume PATH: DeepSpeed unpickles it
                 lambda: resolve_checkpoint(tmp_path), lambda: resolve_checkpoint(path)):
        with pytest.raises(RecipeError, match=f"{path}: {SHARD} {needle}"):
            call()


def test_the_consolidate_command_names_the_checkpoint_and_the_file_in_one_line(tmp_path):
    path = saved(tmp_path, 10)
    (path / SHARD).write_bytes(b"")
    assert_rejected(cli("consolidate", tmp_path, tmp_path / "final"), str(path), SHARD, "has 0 bytes")
    assert not (tmp_path / "final").exists()


def test_a_marker_from_before_the_file_list_is_still_accepted(tmp_path):
    path = saved(tmp_path, 10)
    (path / "complete.json").write_text(json.dumps({"step": 10, "max_steps": 100, "world_size": 2}))
    (path / SHARD).write_bytes(b"")  # nothing to check it against
    assert checkpoints.resume_point(tmp_path, "auto") == path
    assert resolve_checkpoint(tmp_path) == path


def test_a_rollback_moves_the_checkpoints_after_it_aside(tmp_path):
    for step in (4, 8, 12):
        make(tmp_path, step, complete=True)
    moved = checkpoints.set_aside_after(tmp_path, 4)
    assert [p.parent.name for p in moved] == ["rolled-back"] * 2
    assert [p.name.rsplit("-", 2)[0] for p in moved] == ["checkpoint-8", "checkpoint-12"]
    assert names(tmp_path) == ["checkpoint-4"]
    assert checkpoints.set_aside_after(tmp_path, 4) == []


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_run_directory_files_follow_the_umask(tmp_path, umask_022):
    rundir.write_atomic(tmp_path / "run" / "recipe.yaml", "run: {}\n")
    assert stat.S_IMODE((tmp_path / "run" / "recipe.yaml").stat().st_mode) == 0o644
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["recipe.yaml"]  # no temporary file left


@pytest.mark.parametrize("output", ["run", "run/checkpoints", "run/checkpoints/checkpoint-10",
                                    "run/checkpoints/checkpoint-10/model", "run/checkpoints/model", ".",
                                    "link-to-run", "link-to-run/checkpoints/x"])
def test_consolidate_refuses_an_output_that_overlaps_its_checkpoint(tmp_path, output):
    """OUTPUT is replaced whole: equal to, inside or around the checkpoint (or its checkpoints/ directory), even
    through a symlink, it would delete the checkpoints."""
    run = tmp_path / "run"
    path = saved(run, 10)
    (tmp_path / "link-to-run").symlink_to(run)
    with pytest.raises(RecipeError, match="OUTPUT overlaps"):
        consolidate(str(run), str(tmp_path / output), overwrite=True)
    assert checkpoints.complete(run) == [path] and (path / SHARD).is_file()


def test_consolidate_into_the_run_directory_final_passes_the_overlap_check(tmp_path):
    run = tmp_path / "run"
    saved(run, 10)
    with pytest.raises(RecipeError) as refused:  # no config.json in this stand-in: refused later, for that
        consolidate(str(run), str(run / "final"), overwrite=True)
    assert "config.json" in str(refused.value) and "overlaps" not in str(refused.value)


def test_the_consolidate_command_refuses_run_run_overwrite_in_one_line(tmp_path):
    path = saved(tmp_path / "run", 10)
    assert_rejected(cli("consolidate", tmp_path / "run", tmp_path / "run", "--overwrite"), "OUTPUT overlaps",
                    str(path.parent))
    assert checkpoints.complete(tmp_path / "run") == [path]
