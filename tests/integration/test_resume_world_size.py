"""Resuming on another number of ranks, through DeepSpeed's universal checkpoints, on real ranks: a run saved by 2
ranks continues on 1 and one saved by 1 continues on 2, for ZeRO-3 full fine-tuning and ZeRO-2 LoRA, and each goes
on as the uninterrupted run (at the saving world size) does: the same rows at every step (by their hashes,
run.log_samples), the same per-step losses, Adam's step count, and the weights at the checkpoint as the conversion
holds them, bit for bit."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import cli, launch, smoke_recipe

pytestmark = pytest.mark.integration

TRAINING = {"max_steps": 20, "save_steps": 10, "logging_steps": 1, "eval_strategy": "no", "save_total_limit": 3}
LORA = {"deepspeed": {"config": "zero2"}, "lora": {"r": 8, "alpha": 16}, "training": {"learning_rate": 1e-2}}


def step_losses(run_dir: Path) -> dict[int, float]:
    state = json.loads((run_dir / "checkpoints" / "trainer_state.json").read_text())
    return {e["step"]: e["loss"] for e in state["log_history"] if "loss" in e}


def rows_by_step(run_dir: Path) -> dict[int, Counter]:
    """Every rank's, every micro-batch's and every start's rows, by the step they trained."""
    seen: dict[int, Counter] = {}
    for path in (run_dir / "logs").glob("samples-rank*.jsonl"):
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            seen.setdefault(entry["step"], Counter()).update(entry["rows"])
    return seen


def adam_steps(checkpoint: Path) -> list[float]:
    shard = sorted(checkpoint.glob("global_step*/*zero_pp_rank_0_*optim_states.pt"))[0]
    saved = torch.load(shard, weights_only=False)["optimizer_state_dict"]
    inner = saved.get("optimizer_state_dict") or saved["base_optimizer_state"]
    states = inner["state"].values() if isinstance(inner["state"], dict) else inner["state"]
    return [float(s["step"]) for s in states]


def assert_conversion_holds_the_weights(checkpoint: Path, out: Path) -> None:
    """What the checkpoint holds, bit for bit, in the universal fp32 weights the resumed ranks load: the launcher's
    own consolidation of the original shards (full fine-tune), or the adapter saved beside them (LoRA, where only
    the adapter trains)."""
    adapter = checkpoint / "adapter_model.safetensors"
    if adapter.is_file():
        saved = load_file(adapter)
    else:
        result = cli("consolidate", checkpoint, out, "--dtype", "fp32")
        assert result.returncode == 0, result.stderr
        saved = {k: v for f in out.glob("*.safetensors") for k, v in load_file(f).items()}
    folder = checkpoint / (checkpoint / "latest_universal").read_text().strip() / "zero"
    converted = {p.name.replace(".default", ""): p / "fp32.pt" for p in folder.iterdir() if (p / "fp32.pt").is_file()}
    assert converted and set(converted) <= set(saved), sorted(set(converted) - set(saved))[:3]
    for name, path in converted.items():
        fp32 = torch.load(path, weights_only=True)
        fp32 = fp32["param"] if isinstance(fp32, dict) else fp32  # ZeRO-2's files keep the tensor under "param"
        assert torch.equal(fp32.reshape(saved[name].shape), saved[name]), name


@pytest.mark.parametrize(("before", "after", "sections"), [(2, 1, {}), (1, 2, {}), (2, 1, LORA), (1, 2, LORA)],
                         ids=["zero3-2to1", "zero3-1to2", "zero2-lora-2to1", "zero2-lora-1to2"])
def test_a_run_continues_on_another_number_of_ranks(tmp_path, before, after, sections):
    def recipe(name):
        return smoke_recipe(tmp_path, f"{name}.yaml", training={**TRAINING, **sections.get("training", {})},
                            run={"output_dir": str(tmp_path / name), "log_samples": True},
                            **{k: v for k, v in sections.items() if k != "training"})

    launch(recipe("whole"), "--nproc_per_node", before)
    moved = recipe("moved")
    launch(moved, "--nproc_per_node", before, "--training.max_steps=10")
    run_dir, checkpoint = tmp_path / "moved", tmp_path / "moved" / "checkpoints" / "checkpoint-10"
    result, _ = launch(moved, "--nproc_per_node", after)
    assert f"saved by {before} ranks; this run has {after}" in result.stdout
    assert "converted in" in result.stdout and (checkpoint / "universal.json").is_file()
    assert "Traceback" not in result.stdout + result.stderr

    expected, resumed = step_losses(tmp_path / "whole"), step_losses(run_dir)
    assert sorted(resumed) == list(range(1, 21))
    for step in range(11, 21):  # world sizes differ in the order of their sums only
        assert resumed[step] == pytest.approx(expected[step], rel=1e-3), (step, resumed[step], expected[step])
    whole_rows, moved_rows = rows_by_step(tmp_path / "whole"), rows_by_step(run_dir)
    assert sorted(moved_rows) == list(range(1, 21))  # no step trained twice, none skipped
    assert all(moved_rows[s] == whole_rows[s] for s in range(1, 21))  # the same rows at every step
    assert all(sum(moved_rows[s].values()) == 32 for s in moved_rows)  # the global batch, at both world sizes
    assert adam_steps(run_dir / "checkpoints" / "checkpoint-20") == pytest.approx([20.0] * len(
        adam_steps(run_dir / "checkpoints" / "checkpoint-20")))  # one Adam step per training step, every group
    assert_conversion_holds_the_weights(checkpoint, tmp_path / "at-10")
    assert (run_dir / "final" / "config.json").is_file()  # the run's end consolidated the new world's checkpoint
