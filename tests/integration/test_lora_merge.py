"""The streamed LoRA merge: the merged model gives the logits of base + adapter (peft's forward), for Linear and
Conv1D (fan_in_fan_out) and Embedding targets, rsLoRA, rank and alpha patterns, modules_to_save and tied embeddings;
DoRA goes through peft's in-memory merge; and the merge of a 374M-parameter base holds about one tensor, not the model.

The checkpoints are built here in the layout DeepSpeed's ZeRO-3 writes (one rank, the adapter's fp32 values as one flat
group), which launcher/zero_checkpoint.py reads; tests/integration/test_consolidate.py merges a real trained one."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launcher.safetensors_stream import write_model
from tests.helpers import REPO, cli

pytestmark = pytest.mark.integration

STREAMED_NOT = "in-memory merge"  # what the fallback says


def lora_checkpoint(base: Path, out: Path, **lora) -> dict:
    """A LoRA run's checkpoint for the base in BASE, with random adapter values; returns them by name."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = LoraConfig(task_type="CAUSAL_LM", **lora)
    with torch.device("meta"):
        model = get_peft_model(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base)), config)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    generator = torch.Generator().manual_seed(0)
    values = {n: torch.randn(s, generator=generator) * 0.05 for n, s in shapes.items()}  # lora_B nonzero too
    step = out / "global_step1"
    step.mkdir(parents=True)
    (out / "latest").write_text(step.name)
    torch.save({"dp_world_size": 1, "param_shapes": [shapes], "frozen_param_shapes": None, "shared_params": {},
                "global_steps": 1}, step / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    flat = torch.cat([v.reshape(-1) for v in values.values()])
    torch.save({"optimizer_state_dict": {"fp32_flat_groups": [flat]}},
               step / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    config.save_pretrained(out)
    return values


def tiny_base(kind: str, out: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config

    torch.manual_seed(0)
    config = (GPT2Config(vocab_size=96, n_positions=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=0,
                         eos_token_id=0) if kind == "gpt2"
              else AutoConfig.from_pretrained(REPO / "recipes/smoke/model"))
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    return out


CASES = {  # base, LoRA settings, streamed
    "gpt2 conv1d rslora tied": ("gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"],
                                             fan_in_fan_out=True, use_rslora=True, modules_to_save=["ln_f"]), True),
    "llama embedding patterns": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"],
                                               rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 32},
                                               modules_to_save=["lm_head"]), True),
    "llama dora": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True), False),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_merged_logits_equal_base_plus_adapter(tmp_path, case):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    kind, lora, streamed = CASES[case]
    base = tiny_base(kind, tmp_path / "base")
    lora_checkpoint(base, tmp_path / "ckpt", **lora)
    result = cli("consolidate", tmp_path / "ckpt", tmp_path / "out", "--base_model", base)
    assert result.returncode == 0, result.stderr
    assert (STREAMED_NOT not in result.stdout) == streamed, result.stdout
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "out/adapter")
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = adapted(input_ids=ids).logits, merged(input_ids=ids).logits
        unadapted = AutoModelForCausalLM.from_pretrained(base)(input_ids=ids).logits
        peft_merged = adapted.merge_and_unload()(input_ids=ids).logits
    assert (expected - unadapted).abs().max() > 1e-2, "the adapter changed nothing"
    assert (expected - got).abs().max() < 1e-5 and (peft_merged - got).abs().max() < 1e-5


def test_shards_that_do_not_match_the_base_are_refused(tmp_path):
    base = tiny_base("llama", tmp_path / "base")
    lora_checkpoint(base, tmp_path / "ckpt", r=4, lora_alpha=8, target_modules=["q_proj"])
    other = tiny_base("gpt2", tmp_path / "other")  # no q_proj
    wider = tmp_path / "wider"  # a q_proj of other shapes
    wider.mkdir()
    config = json.loads((base / "config.json").read_text())
    (wider / "config.json").write_text(json.dumps({**config, "hidden_size": 256}))
    for ref in (other, wider):
        result = cli("consolidate", tmp_path / "ckpt", tmp_path / "out", "--base_model", ref)
        assert result.returncode == 2 and "do not match this base" in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def peak_rss(*args) -> int:
    """Peak resident bytes of `launcher consolidate ARGS` run alone in a fresh parent (children's max RSS)."""
    code = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)")
    out = subprocess.run([sys.executable, "-c", code, sys.executable, "-m", "launcher", "consolidate", *map(str, args)],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return int(out.stdout.strip().splitlines()[-1])


def test_merging_a_374m_base_holds_about_one_tensor(tmp_path):
    from safetensors import safe_open
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=24,
                         num_attention_heads=16, num_key_value_heads=16, tie_word_embeddings=False, dtype="bfloat16")
    base = tmp_path / "base"
    base.mkdir()
    config.save_pretrained(base)
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        shapes = {n: tuple(t.shape) for n, t in AutoModelForCausalLM.from_config(config).state_dict().items()}
    # random weights, streamed to disk in bf16 as a 2-shard pretrained model
    write_model([(n, s, lambda s=s: [torch.randn(math.prod(s)) * 0.02]) for n, s in shapes.items()], base,
                "bfloat16", 400 * 10**6, progress=lambda _: None)
    weights = sum(map(math.prod, shapes.values()))
    largest = max(map(math.prod, shapes.values())) * 4  # bytes, in fp32
    values = lora_checkpoint(base, tmp_path / "ckpt", r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    small = tiny_base("llama", tmp_path / "small")
    lora_checkpoint(small, tmp_path / "small_ckpt", r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    floor = peak_rss(tmp_path / "small_ckpt", tmp_path / "small_out", "--base_model", small)  # imports, no weights
    peak = peak_rss(tmp_path / "ckpt", tmp_path / "out", "--base_model", base)
    print(f"\n{weights / 1e6:.0f}M parameters ({weights * 4 / 1e9:.2f} GB in fp32, largest tensor "
          f"{largest / 1e6:.0f} MB): peak RSS {peak / 1e9:.2f} GB, of a tiny model {floor / 1e9:.2f} GB")
    assert weights > 300e6 and peak - floor < 4 * largest < weights * 4 / 2, (peak, floor, largest)
    # one merged tensor by hand: W + B @ A * alpha / r, in bf16
    name = "model.layers.3.self_attn.q_proj.weight"
    index = json.loads((tmp_path / "out/model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(tmp_path / "out" / index[name], "pt") as f, safe_open(base / json.loads(
            (base / "model.safetensors.index.json").read_text())["weight_map"][name], "pt") as g:
        got, w = f.get_tensor(name), g.get_tensor(name)
    prefix = "base_model.model." + name.removesuffix(".weight")
    delta = values[f"{prefix}.lora_B.default.weight"] @ values[f"{prefix}.lora_A.default.weight"] * 16 / 8
    assert got.dtype == torch.bfloat16 and torch.equal(got, (w.float() + delta).bfloat16())
