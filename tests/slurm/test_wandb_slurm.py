"""wandb.log_model under Slurm: the job's training step runs without consolidation, so the model goes up in a step
of its own after the consolidation step, into the same W&B run (offline here: the records are real files)."""

from __future__ import annotations

import json
import re

import pytest

from tests.helpers import cli, records, smoke_recipe

pytestmark = [pytest.mark.slurm, pytest.mark.integration]


def test_log_model_uploads_the_model_the_consolidation_step_wrote(slurm_cluster, tmp_path):
    recipe = smoke_recipe(tmp_path, training={"max_steps": 10, "logging_steps": 5, "eval_strategy": "no",
                                              "save_steps": 10},
                          wandb={"project": "launcher-tests", "mode": "offline", "log_model": True})
    result = cli("submit", recipe, "--nodes", 1, "--gpus_per_node", 1, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr + result.stdout
    job = re.search(r"^submitted job (\d+)$", result.stdout, re.M).group(1)
    record = slurm_cluster.wait(job, timeout=400)
    assert (record["JobState"], record["ExitCode"]) == ("COMPLETED", "0:0"), slurm_cluster.describe(job)
    run_dir, final = tmp_path / "run", tmp_path / "run" / "final"
    run_id = json.loads((run_dir / "wandb.json").read_text())["id"]
    assert f"W&B run {run_id}: uploaded the model in {final}" in slurm_cluster.output(job)
    # one W&B run: the training step's segment and the upload step's, with one artifact: the consolidated model
    segments = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(segments) == 2 and all(s.name.endswith(f"-{run_id}") for s in segments)
    artifacts = [r.artifact for s in segments for r in records(next(s.glob("run-*.wandb")))
                 if r.WhichOneof("record_type") == "artifact"]
    assert [a.type for a in artifacts] == ["model"]
    uploaded = {f.path for f in artifacts[0].manifest.contents}
    assert uploaded == {str(p.relative_to(final)) for p in final.rglob("*") if p.is_file()}
    assert "config.json" in uploaded
