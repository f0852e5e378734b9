"""The memory estimate: exact parameter counts without torch, and DeepSpeed's own formulas."""

from __future__ import annotations

import itertools
import json

import pytest
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

from launcher import memory
from tests.conftest import REPO

SHIPPED = sorted(REPO.glob("recipes/**/config.json"))
SMALL = {
    "llama untied, GQA": ("LlamaConfig", {"num_key_value_heads": 2}),
    "llama tied, biases": ("LlamaConfig", {"tie_word_embeddings": True, "attention_bias": True, "mlp_bias": True}),
    "llama explicit head_dim": ("LlamaConfig", {"head_dim": 24, "num_key_value_heads": 1}),
    "mistral": ("MistralConfig", {"num_key_value_heads": 2}),
    "qwen2 tied (qkv bias)": ("Qwen2Config", {"tie_word_embeddings": True, "num_key_value_heads": 2}),
    "qwen3 (q/k norms)": ("Qwen3Config", {"num_key_value_heads": 2, "head_dim": 16}),
    "qwen3 default head_dim": ("Qwen3Config", {"num_key_value_heads": 2}),
}


def small_config(tmp_path, cls_name: str, extra: dict) -> str:
    import transformers

    cls = getattr(transformers, cls_name)
    cfg = cls(vocab_size=1000, hidden_size=64, intermediate_size=176, num_hidden_layers=3, num_attention_heads=4,
              **extra)
    cfg.save_pretrained(tmp_path)
    return str(tmp_path)


@pytest.mark.parametrize("case", SMALL, ids=list(SMALL))
def test_count_matches_the_real_model(tmp_path, case):
    path = small_config(tmp_path, *SMALL[case])
    config = json.loads((tmp_path / "config.json").read_text())
    assert memory.count_params(config) == memory.count_params_meta(path)


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(REPO)) for p in SHIPPED])
def test_count_matches_for_shipped_configs(path):
    assert memory.count_params(json.loads(path.read_text())) == memory.count_params_meta(str(path))


def test_llama_8b_is_8b():
    config = json.loads((REPO / "recipes/llama-3.1-8b/config.json").read_text())
    assert memory.count_params(config).total == 8_030_261_248  # the published size of Llama 3.1 8B


def test_unknown_architecture():
    with pytest.raises(memory.UnknownArchitecture):
        memory.count_params({"model_type": "gpt2"})


GRID = list(itertools.product([1_000_003, 8_030_261_248, 70_553_706_496], [1, 2], [1, 8]))


@pytest.mark.parametrize(("total", "nodes", "gpus"), GRID)
@pytest.mark.parametrize("offload", [False, True])
@pytest.mark.parametrize("stage", [1, 2])
def test_zero2_formula_is_deepspeeds(total, nodes, gpus, offload, stage):
    params = memory.ParamCount(total, total // 50)
    cpu, gpu = estimate_zero2_model_states_mem_needs(total, gpus, nodes, cpu_offload=offload)
    assert memory.model_states_bytes(params, stage, nodes, gpus, offload, False) == (gpu, cpu)


@pytest.mark.parametrize(("total", "nodes", "gpus"), GRID)
@pytest.mark.parametrize(("offload_opt", "offload_params"), [(False, False), (True, False), (True, True)])
def test_zero3_formula_is_deepspeeds(total, nodes, gpus, offload_opt, offload_params):
    largest = total // 50
    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(total, largest, gpus, nodes, cpu_offload=offload_opt,
                                                        cpu_offload_params=offload_params)
    assert memory.model_states_bytes(memory.ParamCount(total, largest), 3, nodes, gpus, offload_opt,
                                     offload_params) == (gpu, cpu)


def test_more_devices_need_less_memory_each():
    params = memory.ParamCount(8_000_000_000, 500_000_000)
    one, _ = memory.model_states_bytes(params, 3, 1, 1, False, False)
    eight, _ = memory.model_states_bytes(params, 3, 1, 8, False, False)
    assert eight < one / 4


@pytest.mark.parametrize("case", SMALL, ids=list(SMALL))
def test_lora_targets_are_the_models_modules(tmp_path, case):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    path = small_config(tmp_path, *SMALL[case])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    adaptable = {name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                 if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))}
    assert memory.lora_targets(json.loads((tmp_path / "config.json").read_text())) == adaptable
