"""Crash and resume on real ranks: a run killed with SIGKILL and started again ends exactly where an uninterrupted
run ends, and checkpoints cut short are skipped, never loaded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.helpers import STEPS, cli, complete_steps, kill_after_first_checkpoint, launch, smoke_recipe

pytestmark = pytest.mark.integration


def step_losses(run_dir: Path) -> dict[int, float]:
    state = json.loads((run_dir / "checkpoints" / "trainer_state.json").read_text())
    return {e["step"]: e["loss"] for e in state["log_history"] if "loss" in e}


def weights(model_dir: Path) -> dict:
    return {name: t for shard in sorted(model_dir.glob("*.safetensors")) for name, t in load_file(shard).items()}


def fake_half_written_save(run_dir: Path, step: int) -> Path:
    """Stand-in for SIGKILL in the middle of a save (its timing cannot be hit reliably): the next checkpoint with one
    rank's optimizer shard missing and, as the kill would leave it, no completion marker."""
    source = run_dir / "checkpoints" / f"checkpoint-{step}"
    partial = run_dir / "checkpoints" / f"checkpoint-{step + 4}"
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(source, partial)
    (partial / "complete.json").unlink()
    for shard in partial.glob("global_step*/*zero_pp_rank_1_*optim_states.pt"):
        shard.unlink()
    return partial


def test_killed_run_resumes_exactly(tmp_path):
    whole = smoke_recipe(tmp_path, "whole.yaml", training=STEPS, run={"output_dir": str(tmp_path / "whole")})
    launch(whole, "--nproc_per_node", 2)

    recipe = smoke_recipe(tmp_path, "killed.yaml", training=STEPS, run={"output_dir": str(tmp_path / "killed")})
    run_dir = tmp_path / "killed"
    k = kill_after_first_checkpoint(recipe, run_dir)
    assert k <= 12, "the kill came too late to leave steps to resume"
    assert not (run_dir / "final").exists()
    partial = fake_half_written_save(run_dir, k)

    result, _ = launch(recipe, "--nproc_per_node", 2)  # the same command again
    assert f"resuming from {run_dir / 'checkpoints' / f'checkpoint-{k}'}" in result.stdout
    assert f"skipping incomplete checkpoint (no complete.json; moved to {run_dir / 'incomplete' / partial.name}" \
        in result.stdout
    assert (run_dir / "incomplete").is_dir() and not partial.exists()

    # Same per-step losses after step k, and bitwise the same weights at the end (fp32 on CPU, same 2 ranks:
    # same data order, optimizer, scheduler and RNG state)
    expected, resumed = step_losses(tmp_path / "whole"), step_losses(run_dir)
    assert sorted(resumed) == list(range(1, 17))
    assert {s: v for s, v in resumed.items() if s > k} == {s: v for s, v in expected.items() if s > k}
    final_whole, final_resumed = weights(tmp_path / "whole" / "final"), weights(run_dir / "final")
    assert final_whole.keys() == final_resumed.keys()
    for name, tensor in final_whole.items():
        assert final_resumed[name].equal(tensor), f"{name} differs after resuming"

    # retention: save_total_limit 2 keeps the newest two complete checkpoints
    assert complete_steps(run_dir) == [12, 16]


def test_a_finished_run_continues_with_more_steps_and_refuses_another_learning_rate(tmp_path):
    """max_steps does not identify the experiment: a finished run given more steps continues from its last
    checkpoint (not 'nothing to do'); a changed learning rate is another experiment, refused naming the key."""
    recipe = smoke_recipe(tmp_path, training={"max_steps": 4, "save_steps": 4, "logging_steps": 1,
                                              "eval_strategy": "no"})
    run_dir = tmp_path / "run"
    launch(recipe, "--nproc_per_node", 2)
    assert complete_steps(run_dir) == [4]
    refused = cli("launch", recipe, "--nproc_per_node", 2, "--training.max_steps=8", "--training.learning_rate=1e-4")
    assert refused.returncode == 2 and "training.learning_rate changed" in refused.stderr, refused.stderr
    assert refused.stderr.count("\n") == 1 and complete_steps(run_dir) == [4]

    result, _ = launch(recipe, "--nproc_per_node", 2, "--training.max_steps=8")
    assert f"resuming from {run_dir / 'checkpoints' / 'checkpoint-4'}" in result.stdout
    assert "training.max_steps: 4 -> 8" in result.stdout
    assert complete_steps(run_dir)[-1] == 8 and sorted(step_losses(run_dir)) == list(range(1, 9))
    again = cli("launch", recipe, "--nproc_per_node", 2, "--training.max_steps=8")
    assert again.returncode == 0 and "already trained to the end (checkpoint-8); nothing to do" in again.stdout
