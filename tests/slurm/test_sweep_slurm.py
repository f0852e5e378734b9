"""`launcher sweep --slurm` on the real two-node cluster: one job array, a task per variant, each training and
consolidating its own run directory; a task stopped with USR1 requeues itself alone and resumes; the report ranks
the variants."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.helpers import cli, smoke_recipe

pytestmark = [pytest.mark.slurm, pytest.mark.integration]

ENV = {"OMP_NUM_THREADS": "1"}  # the emulated nodes share this machine's cores
GRID = "training.learning_rate=[1e-4,3e-3]"


def sweep(recipe: Path, *flags: str) -> tuple[str, Path]:
    result = cli("sweep", recipe, "--grid", GRID, "--slurm", "--nodes", 1, "--gpus_per_node", 1, *flags, env=ENV)
    assert result.returncode == 0, result.stderr + result.stdout
    job = re.search(r"^submitted job array (\d+) \(2 tasks", result.stdout, re.M).group(1)
    return job, recipe.parent / "run-sweep"


def report(sweep_dir: Path) -> dict:
    result = cli("sweep_report", sweep_dir, "--format", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_array_trains_every_variant_in_its_own_task(slurm_cluster, tmp_path):
    recipe = smoke_recipe(tmp_path, training={"max_steps": 10, "logging_steps": 5, "eval_steps": 10,
                                              "save_steps": 10})
    job, sweep_dir = sweep(recipe, "--max_parallel", "2")
    names = ["v00-learning_rate=0.0001", "v01-learning_rate=0.003"]
    # queued or starting (a task takes far longer than this to train): the report asks Slurm
    for row in report(sweep_dir)["variants"]:
        assert re.fullmatch(rf"(pending|running) \(job {job}_[01]\)", row["status"]), row
    for task, name in enumerate(names):
        record = slurm_cluster.wait(f"{job}_{task}", timeout=400)
        assert (record["JobState"], record["ExitCode"]) == ("COMPLETED", "0:0"), slurm_cluster.describe(f"{job}_{task}")
        log = (sweep_dir / "logs" / f"smoke-sweep-{job}_{task}.log").read_text(errors="replace")
        assert f"launcher: array task {job}_{task} trains {sweep_dir / name}" in log
        assert (sweep_dir / name / "final" / "config.json").is_file()  # each task consolidated its own run
        assert (sweep_dir / name / "ds_config.json").is_file()
    rows = report(sweep_dir)["variants"]
    assert [r["variant"] for r in rows] == names[::-1]  # 10 steps at 1e-4 hardly move the model
    assert [(r["rank"], r["status"], r["steps"]) for r in rows] == [(1, "finished", 10), (2, "finished", 10)]
    assert rows[0]["eval"]["eval_loss"] < rows[1]["eval"]["eval_loss"]
    manifest = json.loads((sweep_dir / "sweep.json").read_text())
    assert [v["job"] for v in manifest["variants"]] == [f"{job}_0", f"{job}_1"]
    # submitted again: nothing left to train, nothing queued
    again = cli("sweep", recipe, "--grid", GRID, "--slurm", "--nodes", 1, "--gpus_per_node", 1, env=ENV)
    assert again.returncode == 0 and "nothing to submit" in again.stdout, again.stderr


def test_stopped_task_requeues_alone_and_resumes(slurm_cluster, tmp_path):
    recipe = smoke_recipe(tmp_path, training={"max_steps": 40, "logging_steps": 5, "eval_steps": 40,
                                              "save_steps": 1000}, run={"consolidate": False})
    job, sweep_dir = sweep(recipe)
    log = sweep_dir / "logs" / f"smoke-sweep-{job}_1.log"
    slurm_cluster.wait(f"{job}_1", until=lambda _: log.is_file() and "loss=" in log.read_text(errors="replace"),
                       what="training", timeout=300)
    slurm_cluster.run("scancel", "--batch", "--signal=USR1", f"{job}_1")
    records = [slurm_cluster.wait(f"{job}_{task}", timeout=400) for task in (0, 1)]
    for task, record in enumerate(records):
        assert (record["JobState"], record["ExitCode"]) == ("COMPLETED", "0:0"), slurm_cluster.describe(f"{job}_{task}")
    # only the stopped task was requeued. The last task of an array usually runs under the array's own job id, so
    # `scontrol requeue $SLURM_JOB_ID` from it would have requeued the whole array.
    assert [r["Restarts"] for r in records] == ["0", "1"]
    text = log.read_text(errors="replace")
    assert f"requeueing job {job}_1 to resume from it" in text
    stopped = int(re.search(r"stopped at step (\d+) on request", text).group(1))
    assert f"resuming from checkpoint-{stopped}" in text and 5 <= stopped < 40
    rows = report(sweep_dir)["variants"]
    assert [(r["status"], r["steps"]) for r in rows] == [("finished", 40), ("finished", 40)]
