"""Tokenize once, on real ranks: the worker's trainer stores what it tokenized and a later start of the run loads
it from the cache on every rank; `launch` tokenizes in the launching process before any rank starts, so a second
sweep variant with the same data (another learning rate) tokenizes nothing. The Slurm requeue is in
tests/slurm/test_submit.py. Each start's record is the run directory's tokenized.jsonl."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.helpers import REPO, cli, complete_steps, free_port, launch, smoke_recipe

pytestmark = pytest.mark.integration

ENV = {"OMP_NUM_THREADS": "1"}
STEPS = {"max_steps": 2, "save_steps": 2, "logging_steps": 1, "eval_strategy": "no"}


def records(run_dir: Path) -> list[tuple[str, bool, str]]:
    """(split, from the cache?, by whom) of each preparation recorded in the run directory, in order."""
    lines = (run_dir / "tokenized.jsonl").read_text().splitlines()
    return [(r["split"], r["from_cache"], r["by"]) for r in map(json.loads, lines)]


def test_a_second_start_loads_what_the_ranks_tokenized(tmp_path):
    recipe = smoke_recipe(tmp_path, training=STEPS, run={"consolidate": False})
    run_dir, cache = tmp_path / "run", tmp_path / "tokenized"

    # first start: the ranks as `deepspeed --module launcher.train` starts them, no launcher before them: both ranks
    # run TRL's preparation (it has barriers inside), rank 0 stores the result
    planned = cli("plan", recipe, "--nproc_per_node", 2, "--master_port", free_port(), "--format", "json")
    assert planned.returncode == 0, planned.stderr
    plan = json.loads(planned.stdout)
    first = subprocess.run([*plan["command"][:-1], str(recipe)], cwd=REPO, capture_output=True, text=True,
                           timeout=600, env={**os.environ, **ENV, **plan["env"]})
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert first.stdout.count(f"tokenizing train set: 4000 rows, cached at {cache}/train-") == 1  # rank 0 says it
    assert records(run_dir) == [("train", False, "worker"), ("eval", False, "worker")]
    assert sorted(p.name.split("-")[0] for p in cache.iterdir()) == ["eval", "train"]
    assert complete_steps(run_dir) == [2]

    # second start (a resume, two steps more): loaded from the cache, by the launching process and by every rank
    second, _ = launch(recipe, "--nproc_per_node", 2, "--training.max_steps=4", env=ENV)
    assert "resuming from" in second.stdout
    assert "tokenizing" not in second.stdout, second.stdout[-3000:]
    assert second.stdout.count(f"data: train set tokenized from cache {cache}/train-") == 2  # launch, then rank 0
    assert records(run_dir)[2:] == [("train", True, "preprocess"), ("eval", True, "preprocess"),
                                    ("train", True, "worker"), ("eval", True, "worker")]
    assert complete_steps(run_dir)[-1] == 4


def test_a_second_sweep_variant_with_the_same_data_does_not_tokenize_again(tmp_path):
    recipe = smoke_recipe(tmp_path, training=STEPS, run={"consolidate": False})
    result = cli("sweep", recipe, "--grid", "training.learning_rate=[1e-3, 3e-3]", "--nproc_per_node", 2,
                 "--master_port", free_port(), env=ENV, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    sweep_dir = tmp_path / "run-sweep"
    first, second = (sweep_dir / name for name in ("v00-learning_rate=0.001", "v01-learning_rate=0.003"))
    # the first variant's launch tokenized, before its ranks started; its ranks loaded that
    assert records(first) == [("train", False, "preprocess"), ("eval", False, "preprocess"),
                              ("train", True, "worker"), ("eval", True, "worker")]
    # the second, with another learning rate, tokenized nothing
    assert records(second) == [("train", True, "preprocess"), ("eval", True, "preprocess"),
                               ("train", True, "worker"), ("eval", True, "worker")]
    assert result.stdout.count("tokenizing train set: 4000 rows") == 1
    entries = sorted(p.name.split("-")[0] for p in (sweep_dir / "tokenized").iterdir())
    assert entries == ["eval", "train"]  # one entry per split, shared
