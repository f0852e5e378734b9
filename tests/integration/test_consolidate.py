"""Consolidation: bit-exact against the live engine, LoRA merged to the same logits, broken checkpoints refused."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import GATHER, QUICK, REPO, cli, free_port, launch, smoke_recipe

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", params=[2, 3], ids=["zero2", "zero3"])
def engine_dump(request, tmp_path_factory):
    """A 2-rank DeepSpeed checkpoint and the fp32 weights gathered from the live engine that saved it."""
    out = tmp_path_factory.mktemp(f"zero{request.param}")
    command = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
               str(REPO / "tests/integration/zero_engine_dump.py"), str(request.param), str(out)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


def read_model(directory: Path) -> dict:
    """The tensors of a written model; each shard (written in parallel) holds exactly what the index maps to it."""
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    tensors = {}
    for shard in sorted(set(index["weight_map"].values())):
        found = load_file(str(directory / shard))
        assert set(found) == {n for n, f in index["weight_map"].items() if f == shard}, shard
        tensors.update(found)
    assert set(tensors) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    return tensors


def test_bit_exact_against_the_live_engine(engine_dump, tmp_path):
    result = cli("consolidate", engine_dump / "ckpt", tmp_path / "model", "--base_model", engine_dump / "base",
                 "--dtype", "fp32", "--max_shard_size", "20KB")
    assert result.returncode == 0, result.stderr
    live = load_file(str(engine_dump / "live.safetensors"))
    ours = read_model(tmp_path / "model")
    assert set(ours) == set(live)  # tied lm_head written once, frozen matrix present
    assert "model.layers.0.mlp.down_proj.weight" in ours
    for name, tensor in live.items():
        assert torch.equal(ours[name], tensor), name
    index = json.loads((tmp_path / "model/model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1

    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "model", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    loaded = model.state_dict()  # through the index, as a user loads it: every trained tensor, bit for bit
    for name, tensor in live.items():
        assert torch.equal(loaded[name], tensor), name
    assert torch.equal(model.lm_head.weight, live["model.embed_tokens.weight"])


def test_bf16_output_is_torch_cast_of_the_trained_weights(engine_dump, tmp_path):
    """The cast happens while copying, a block at a time: the same bytes as casting each whole tensor."""
    result = cli("consolidate", engine_dump / "ckpt", tmp_path / "model", "--base_model", engine_dump / "base",
                 "--dtype", "bf16", "--max_shard_size", "20KB")
    assert result.returncode == 0, result.stderr
    live, ours = load_file(str(engine_dump / "live.safetensors")), read_model(tmp_path / "model")
    assert set(ours) == set(live)
    for name, tensor in live.items():
        assert ours[name].dtype == torch.bfloat16 and torch.equal(ours[name], tensor.bfloat16()), name


def broken(engine_dump: Path, tmp_path: Path, damage) -> Path:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(engine_dump / "ckpt", ckpt)
    damage(ckpt, ckpt / (ckpt / "latest").read_text().strip())
    return ckpt


DAMAGE = {
    "missing rank shard": (lambda c, s: next(s.glob("*rank_1_*optim_states.pt")).unlink(), "rank 1"),
    "extra rank shard": (lambda c, s: shutil.copy(next(s.glob("*rank_1_*optim_states.pt")),
                                                  s / "zero_pp_rank_2_mp_rank_00_optim_states.pt"),
                         "saved world size is 2"),
    "latest names nothing": (lambda c, s: (c / "latest").write_text("global_step99"), "global_step99"),
    "truncated shard": (lambda c, s: next(s.glob("*rank_0_*optim_states.pt")).write_bytes(b"PK\x03\x04"),
                        "cannot be read"),
}


@pytest.mark.parametrize("case", DAMAGE, ids=list(DAMAGE))
def test_broken_checkpoint_is_refused_and_nothing_written(engine_dump, tmp_path, case):
    damage, needle = DAMAGE[case]
    ckpt = broken(engine_dump, tmp_path, damage)
    result = cli("consolidate", ckpt, tmp_path / "model", "--base_model", engine_dump / "base")
    assert result.returncode == 2 and needle in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "model").exists() and not list(tmp_path.glob(".model.partial-*"))


def test_wrong_base_model_and_existing_output_are_refused(engine_dump, tmp_path):
    other = tmp_path / "other"
    config = json.loads((engine_dump / "base/config.json").read_text())
    other.mkdir()
    (other / "config.json").write_text(json.dumps({**config, "intermediate_size": 60}))
    result = cli("consolidate", engine_dump / "ckpt", tmp_path / "model", "--base_model", other)
    assert result.returncode == 2 and "wrong shape" in result.stderr, result.stderr
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "keep.txt").write_text("mine")
    result = cli("consolidate", engine_dump / "ckpt", tmp_path / "model", "--base_model", engine_dump / "base")
    assert result.returncode == 2 and "--overwrite" in result.stderr
    assert (tmp_path / "model" / "keep.txt").read_text() == "mine"


def test_lora_run_ends_with_a_merged_model_matching_base_plus_adapter(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_dir = REPO / "recipes/smoke/model"
    recipe = smoke_recipe(tmp_path, training={**QUICK, "learning_rate": 1e-2}, lora={"r": 8, "alpha": 16},
                          deepspeed={"overrides": GATHER})
    launch(recipe, "--nproc_per_node", 2)
    final = tmp_path / "run" / "final"
    merged = AutoModelForCausalLM.from_pretrained(final)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    adapted = PeftModel.from_pretrained(base, final / "adapter")
    ids = torch.randint(0, base.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = adapted(input_ids=ids).logits, merged(input_ids=ids).logits
        unadapted = AutoModelForCausalLM.from_pretrained(base_dir)(input_ids=ids).logits
    assert (expected - unadapted).abs().max() > 1e-3, "the adapter changed nothing"
    assert (expected - got).abs().max() < 1e-5
