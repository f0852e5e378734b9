"""`launcher sweep` on real ranks: a 3-variant grid of the smoke recipe trained one variant after another on 2 CPU
ranks, past a variant whose ranks die, ranked by eval loss; run again, it skips what is done."""

from __future__ import annotations

import json
import re
import textwrap
import time

import pytest
import yaml

from tests.helpers import cli, free_port, smoke_recipe

pytestmark = pytest.mark.integration

ENV = {"OMP_NUM_THREADS": "1"}
STEPS = {"max_steps": 10, "logging_steps": 5, "eval_strategy": "steps", "eval_steps": 10, "save_steps": 10}
GRID = "training.learning_rate=[1e-4, 1e-3, 3e-3]"
# The ranks of the variant whose recipe path holds $FAIL_VARIANT die at start-up, as a broken node would make them.
FAULT = textwrap.dedent('''
    import os, sys
    if os.environ.get("RANK") is not None and os.environ.get("FAIL_VARIANT", "-") in " ".join(sys.argv):
        os._exit(3)
''')


def test_local_sweep_trains_each_variant_continues_past_a_failure_and_ranks(tmp_path):
    (tmp_path / "fault").mkdir()
    (tmp_path / "fault" / "sitecustomize.py").write_text(FAULT)
    recipe = smoke_recipe(tmp_path, training=STEPS, run={"consolidate": False},
                          wandb={"project": "launcher-tests", "mode": "disabled"})
    args = ("sweep", recipe, "--grid", GRID, "--nproc_per_node", 2, "--master_port", free_port())
    env = {**ENV, "PYTHONPATH": str(tmp_path / "fault"), "FAIL_VARIANT": "/v01-"}
    result = cli(*args, env=env, timeout=400)
    assert result.returncode == 1, result.stdout[-4000:] + result.stderr[-4000:]  # one variant failed
    assert "[2/3] v01-learning_rate=0.001: failed (exit code" in result.stderr

    sweep_dir = tmp_path / "run-sweep"
    manifest = json.loads((sweep_dir / "sweep.json").read_text())
    assert [v["exit_code"] != 0 for v in manifest["variants"]] == [False, True, False]
    evals = {}
    for entry in manifest["variants"][::2]:
        run_dir = sweep_dir / entry["name"]
        assert entry["run_dir"] == str(run_dir)
        snapshot = yaml.safe_load((run_dir / "recipe.yaml").read_text())
        assert snapshot["run"]["name"] == f"smoke-{entry['name']}" and snapshot["wandb"]["group"] == "smoke-sweep"
        assert snapshot["training"]["learning_rate"] == entry["overrides"]["training.learning_rate"]
        state = json.loads((run_dir / "checkpoints" / "trainer_state.json").read_text())
        assert state["global_step"] == 10
        evals[entry["name"]] = [e["eval_loss"] for e in state["log_history"] if "eval_loss" in e][-1]

    # the report ends the sweep's output: best eval loss first, the failed variant last
    table = result.stdout[result.stdout.index("sweep " + str(sweep_dir) + ": 3 variants, ranked"):].splitlines()
    assert "ranked by eval_loss (lower is better)" in table[0]
    rows = [line.split() for line in table[2:5]]
    assert table[5] == f"curves:        {sweep_dir / 'curves.png'}"  # and one plot of the variants
    best, worst = sorted(evals, key=evals.get)
    assert [r[1] for r in rows] == [best, worst, "v01-learning_rate=0.001"]
    assert best == "v02-learning_rate=0.003"  # 10 steps at 1e-4 hardly move the model
    assert rows[0][:3] == ["1", best, "10/10"] and float(rows[0][4]) == pytest.approx(evals[best], rel=1e-3)
    assert rows[2][0] == "-" and "failed (exit" in table[4]

    # the same command again: the finished variants are skipped, the failed one is trained now
    began = time.monotonic()
    again = cli(*args, env=ENV, timeout=300)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    assert again.stdout.count("already trained to the end; skipped") == 2
    report = json.loads(cli("sweep-report", sweep_dir, "--format", "json").stdout)
    assert [r["status"] for r in report["variants"]] == ["finished"] * 3
    assert [r["rank"] for r in report["variants"]] == [1, 2, 3]
    assert time.monotonic() - began < 120
    assert re.search(r"^\[1/3\] v00-learning_rate=0.0001: already trained", again.stdout, re.M)
