"""`launcher submit` on a real two-node Slurm cluster (slurm/local_cluster.sh): a multi-node job that trains and
consolidates, a preempted job that checkpoints, requeues and resumes, and a failure on one node that fails the job."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from tests.helpers import FAULT, SECRETS, cli, complete_steps, smoke_recipe

pytestmark = [pytest.mark.slurm, pytest.mark.integration]

# The two emulated nodes share this machine's cores: one thread per rank, as on real nodes with their own cores.
ENV = {"OMP_NUM_THREADS": "1"}
TWO_NODES = ("--nodes", "2", "--gpus_per_node", "1")


def submit(recipe, *flags, env: dict | None = None) -> tuple[str, str]:
    result = cli("submit", recipe, *TWO_NODES, *flags, env={**ENV, **(env or {})})
    assert result.returncode == 0, result.stderr + result.stdout
    job = re.search(r"^submitted job (\d+)$", result.stdout, re.M).group(1)
    log = re.search(r"^log: (.+)$", result.stdout.split("submitted job")[1], re.M).group(1)
    return job, log


def test_two_node_job_trains_and_consolidates(slurm_cluster, tmp_path):
    recipe = smoke_recipe(tmp_path, training={"max_steps": 30, "eval_steps": 15, "save_steps": 15},
                          wandb={"project": "launcher-tests", "mode": "offline"})
    job, log = submit(recipe, env=SECRETS)
    record = slurm_cluster.wait(job, timeout=600)
    assert (record["JobState"], record["ExitCode"]) == ("COMPLETED", "0:0"), slurm_cluster.describe(job)
    assert record["NodeList"] == "n[1-2]"
    text = Path(log).read_text(errors="replace")
    run_dir = tmp_path / "run"
    # both nodes' launchers ran their own node rank, and every rank wrote its shards
    assert "2 node(s) x 1 ranks = world size 2" in text
    for rank in (0, 1):
        assert json.loads((run_dir / "ranks" / f"rank{rank}.json").read_text())["world_size"] == 2
    step_dir = run_dir / "checkpoints" / "checkpoint-30" / "global_step30"
    assert len(list(step_dir.glob("*zero_pp_rank_*_optim_states.pt"))) == 2
    assert (run_dir / "checkpoints" / "checkpoint-30" / "complete.json").is_file()
    # consolidation ran as the job's last step, and its result loads
    assert "consolidated model:" in text
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(run_dir / "final")
    # the job script, log and everything else written hold no secret from the submitting environment
    for path in [p for p in tmp_path.rglob("*") if p.is_file()]:
        for name, value in SECRETS.items():
            assert value.encode() not in path.read_bytes(), f"{name} leaked into {path}"


@pytest.mark.parametrize("resume", [(), ("--resume", "never")], ids=["auto", "never"])
def test_preempted_job_checkpoints_requeues_and_finishes(slurm_cluster, tmp_path, resume):
    """--resume never (or a PATH) is for the first start: the requeued job continues its own checkpoint."""
    recipe = smoke_recipe(tmp_path, training={"max_steps": 60, "eval_strategy": "no", "save_steps": 1000})
    run_dir = tmp_path / "run"
    job, log = submit(recipe, *resume)
    slurm_cluster.wait_output(job, "loss=", timeout=300)  # on the bar every 10 steps: training is under way
    assert not complete_steps(run_dir)  # and no checkpoint yet (save_steps is beyond max_steps)
    slurm_cluster.run("scancel", "--batch", "--signal=USR1", job)
    record = slurm_cluster.wait(job, timeout=600)
    text = Path(log).read_text(errors="replace")
    assert (record["JobState"], record["ExitCode"]) == ("COMPLETED", "0:0"), slurm_cluster.describe(job)
    assert record["Restarts"] == "1", record
    stopped = int(re.search(r"stopped at step (\d+) on request", text).group(1))
    assert 10 <= stopped < 60
    assert f"resuming from checkpoint-{stopped}" in text
    assert "launcher: job " + job + " (restart 1)" in text
    state = json.loads((run_dir / "checkpoints" / "trainer_state.json").read_text())
    assert state["global_step"] == 60
    assert complete_steps(run_dir)[-1] == 60 and (run_dir / "final").is_dir()
    # tokenized once, by submit before the queue: the job's starts, the requeued one too, loaded it from the cache
    # (each node's launch before its ranks, then rank 0 for every rank)
    prepared = [json.loads(line) for line in (run_dir / "tokenized.jsonl").read_text().splitlines()]
    assert [(p["split"], p["job"]) for p in prepared if not p["from_cache"]] == [("train", None), ("eval", None)]
    requeued = [(p["split"], p["by"]) for p in prepared if p["restart"] == 1]
    assert sorted(requeued) == sorted([("train", "preprocess"), ("eval", "preprocess")] * 2
                                      + [("train", "worker"), ("eval", "worker")]), prepared
    assert "tokenizing" not in text, "a start of the job tokenized the data again"


def test_failure_on_one_node_fails_the_job_quickly(slurm_cluster, tmp_path):
    (tmp_path / "fault").mkdir()
    (tmp_path / "fault" / "sitecustomize.py").write_text(FAULT)  # rank 1, on the second node, cannot read its data
    recipe = smoke_recipe(tmp_path, training={"max_steps": 400, "eval_strategy": "no"})
    began = time.monotonic()
    job, log = submit(recipe, env={"PYTHONPATH": str(tmp_path / "fault")})
    record = slurm_cluster.wait(job, timeout=300)
    assert record["JobState"] == "FAILED" and record["ExitCode"] != "0:0", slurm_cluster.describe(job)
    assert time.monotonic() - began < 180
    text = Path(log).read_text(errors="replace")
    assert "failed: OSError: injected: cannot read train.jsonl on this node" in text
    assert record["Restarts"] == "0", "a failed job must not requeue itself"


def test_stopped_job_resubmitted_on_one_node_continues(slurm_cluster, tmp_path):
    """A two-node job stopped with USR1 (its requeue cancelled: the queue is shorter now), resubmitted with --nodes 1:
    it continues from the two-node checkpoint, converted to DeepSpeed's universal format, and completes."""
    recipe = smoke_recipe(tmp_path, training={"max_steps": 60, "eval_strategy": "no", "save_steps": 1000})
    run_dir = tmp_path / "run"
    job, _ = submit(recipe)
    slurm_cluster.wait_output(job, "loss=", timeout=300)
    slurm_cluster.run("scancel", "--batch", "--signal=USR1", job)
    text = slurm_cluster.wait_output(job, "stopped at step", timeout=300)
    stopped = int(re.search(r"stopped at step (\d+) on request", text).group(1))
    slurm_cluster.run("scancel", job)
    slurm_cluster.wait(job, timeout=120)
    assert complete_steps(run_dir) == [stopped]

    result = cli("submit", recipe, "--nodes", 1, "--gpus_per_node", 1, env=ENV)
    assert result.returncode == 0, result.stderr + result.stdout
    assert "saved by 2 ranks; this run has 1" in result.stdout
    again = re.search(r"^submitted job (\d+)$", result.stdout, re.M).group(1)
    record = slurm_cluster.wait(again, timeout=600)
    assert (record["JobState"], record["ExitCode"]) == ("COMPLETED", "0:0"), slurm_cluster.describe(again)
    text = slurm_cluster.output(again)
    assert "converted in" in text and f"resuming from checkpoint-{stopped}" in text
    state = json.loads((run_dir / "checkpoints" / "trainer_state.json").read_text())
    assert state["global_step"] == 60 and (run_dir / "final").is_dir()
    assert json.loads((run_dir / "ranks" / "rank0.json").read_text())["world_size"] == 1
