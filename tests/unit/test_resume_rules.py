"""Resume identity, through the gate as `submit --dry_run` runs it (nothing trains, nothing is queued): a continued
run takes changes to keys that do not identify the experiment and says so; a change to one that does is refused,
naming it. And run.resume never|PATH is for the first start only."""

from __future__ import annotations

import pytest

from launcher import checkpoints, pipeline, rundir
from tests.helpers import cli, fake_checkpoint

JOB = ("--nodes", "2", "--gpus_per_node", "1")


@pytest.fixture
def finished_run(recipe_factory, tmp_path):
    """A run directory as a finished 2-rank job leaves it: the resolved recipe snapshot and its last checkpoint."""
    recipe = recipe_factory(training={"max_steps": 150}, wandb={"project": "p", "mode": "offline"})
    run = pipeline.prepare(str(recipe), {"slurm.nodes": 2, "slurm.gpus_per_node": 1}, None, check_data=False)
    rundir.prepare(run.run_dir, run.plan.snapshot())
    fake_checkpoint(run.run_dir, 150, world=2, max_steps=150)
    return recipe


def submit(recipe, *flags):
    return cli("submit", recipe, *JOB, "--dry_run", *flags)


def test_a_finished_run_is_finished_until_it_is_given_more_steps(finished_run):
    done = submit(finished_run)
    assert done.returncode == 0 and "already trained to the end (checkpoint-150)" in done.stdout, done.stderr
    more = submit(finished_run, "--training.max_steps=300")
    assert more.returncode == 0, more.stderr
    assert "resuming from" in more.stdout and "checkpoint-150" in more.stdout
    assert "changed since the run started: training.max_steps: 150 -> 300" in more.stdout


def test_cluster_and_tracking_settings_change_freely(finished_run):
    result = submit(finished_run, "--training.max_steps=300", "--time", "01:00:00", "--partition", "other",
                    "--wandb.tags=[ablation]", "--training.logging_steps=5")
    assert result.returncode == 0, result.stderr
    for change in ("slurm.time: None -> '01:00:00'", "slurm.partition: None -> 'other'",
                   "wandb.tags: [] -> ['ablation']", "training.logging_steps: 10 -> 5"):
        assert change in result.stdout, result.stdout


@pytest.mark.parametrize(("flag", "key"), [
    ("--training.learning_rate=1e-4", "training.learning_rate"),
    ("--training.max_steps=100", "training.max_steps"),  # shorter: the schedule would end elsewhere
    ("--data.eval_fraction=0.1", "data.eval_fraction"),
    ("--model.dtype=auto", "model.dtype"),
])
def test_a_change_that_identifies_the_experiment_is_refused(finished_run, tmp_path, flag, key):
    before = (tmp_path / "run" / "recipe.yaml").read_text()
    result = submit(finished_run, "--training.max_steps=300", flag) if "max_steps" not in flag else submit(
        finished_run, flag)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stdout + result.stderr
    assert f"{key} changed" in result.stderr and "new run.name" in result.stderr
    assert (tmp_path / "run" / "recipe.yaml").read_text() == before


def test_resume_never_and_a_path_apply_to_the_first_start_only(tmp_path):
    run_dir, elsewhere = tmp_path / "run", tmp_path / "other"
    fake_checkpoint(run_dir, 10, world=2)
    newest = fake_checkpoint(run_dir, 20, world=2)
    older = run_dir / "checkpoints" / "checkpoint-10"
    foreign = fake_checkpoint(elsewhere, 5, world=2)
    with pytest.raises(Exception, match="already holds checkpoints"):
        checkpoints.resume_point(run_dir, "never")  # a new start on an old run: refused
    assert checkpoints.resume_point(run_dir, "never", requeued=True) == newest  # the job's own requeue
    assert checkpoints.resume_point(run_dir, str(foreign)) == newest  # PATH again would lose steps 5..20
    assert checkpoints.resume_point(run_dir, str(older)) == older  # a PATH of this run rolls back to it
    assert checkpoints.resume_point(tmp_path / "fresh", str(foreign)) == foreign  # the first start
    assert checkpoints.resume_point(tmp_path / "fresh", "never", requeued=True) is None


def test_a_checkpoint_of_another_zero_stage_is_refused(recipe_factory, tmp_path):
    """Where deepspeed.config lives does not identify the run, but its stage does: the shards are laid out per stage."""
    checkpoint = fake_checkpoint(tmp_path / "run", 20, world=2)
    marker = checkpoint / "complete.json"
    marker.write_text(marker.read_text().replace("}", ', "zero_stage": 2}'))
    result = submit(recipe_factory(), "--training.max_steps=300")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stdout + result.stderr
    assert "checkpoint-20: saved under ZeRO-2, and deepspeed.config is ZeRO-3 now" in result.stderr


def test_a_finished_run_is_not_preflighted_or_submitted(finished_run):
    """--preflight on a finished run would spend minutes on a dry run only to submit nothing."""
    result = cli("submit", finished_run, *JOB, "--preflight", "--tiny")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "already trained to the end (checkpoint-150); nothing to submit" in result.stdout
    assert "--- dry run report" not in result.stdout and "submitted job" not in result.stdout
