"""The memory estimate: exact parameter counts without torch, and DeepSpeed's own formulas."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import pytest
import torch
import transformers
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

from launcher import memory
from tests.helpers import REPO

# The decoder configs shipped; the encoder of the sentiment recipe has no formula, plan counts it on the meta device.
SHIPPED = sorted(p for p in set(REPO.glob("recipes/*/model/config.json")) | set(REPO.glob("recipes/**/config.json"))
                 if json.loads(p.read_text())["model_type"] in memory.FAMILIES)
TINY = {"vocab_size": 32064, "hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 3,
        "num_attention_heads": 4}  # vocab: phi3's default pad_token_id is 32000
SMALL = {
    "llama untied, GQA": ("LlamaConfig", {"num_key_value_heads": 2}),
    "llama tied, biases": ("LlamaConfig", {"tie_word_embeddings": True, "attention_bias": True, "mlp_bias": True}),
    "llama explicit head_dim": ("LlamaConfig", {"head_dim": 24, "num_key_value_heads": 1}),
    "mistral GQA": ("MistralConfig", {"num_key_value_heads": 2}),
    "mistral explicit head_dim, tied": ("MistralConfig", {"head_dim": 32, "tie_word_embeddings": True}),
    "qwen2 tied (qkv bias)": ("Qwen2Config", {"tie_word_embeddings": True, "num_key_value_heads": 2}),
    "qwen2 untied": ("Qwen2Config", {"num_key_value_heads": 4}),
    "qwen3 q/k norms": ("Qwen3Config", {"num_key_value_heads": 2, "head_dim": 16}),
    "qwen3 default head_dim, bias": ("Qwen3Config", {"num_key_value_heads": 2, "attention_bias": True}),
    "qwen3 tied": ("Qwen3Config", {"num_key_value_heads": 1, "head_dim": 8, "tie_word_embeddings": True}),
    "gemma": ("GemmaConfig", {"num_key_value_heads": 1, "head_dim": 16}),
    "gemma2 untied": ("Gemma2Config", {"num_key_value_heads": 2, "head_dim": 32, "tie_word_embeddings": False}),
    "gemma3_text": ("Gemma3TextConfig", {"num_key_value_heads": 2, "head_dim": 16}),
    "phi3 GQA": ("Phi3Config", {"num_key_value_heads": 2}),
    "phi3 tied": ("Phi3Config", {"tie_word_embeddings": True}),
}
# full: every key, as to_dict gives it; diff: what save_pretrained writes (class defaults left out); bare: sizes only
FORMS = ("full", "diff", "bare")


def config_dict(cls_name: str, extra: dict, form: str) -> dict:
    """A realistic config.json dict for a tiny model of one family."""
    cfg = getattr(transformers, cls_name)(**TINY, **extra)
    if form == "bare":
        return {"model_type": cfg.model_type, **TINY}
    return json.loads(cfg.to_json_string(use_diff=form == "diff"))


def write(tmp_path, config: dict) -> str:
    """config as tmp_path/config.json; its path."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return str(path)


def meta_model(config_path: str) -> torch.nn.Module:
    """The model a config describes, on the meta device."""
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(config_path))


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("case", SMALL, ids=list(SMALL))
def test_count_matches_the_real_model(tmp_path, case, form):
    config = config_dict(*SMALL[case], form)
    assert memory.count_params(config) == memory.count_params_meta(write(tmp_path, config))


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("case", SMALL, ids=list(SMALL))
def test_names_and_shapes_match_the_real_model(tmp_path, case, form):
    """What consolidation checks checkpoints against without transformers: every parameter, named and shaped as
    the model has it (a tied lm_head left out: transformers re-ties it)."""
    config = config_dict(*SMALL[case], form)
    model = meta_model(write(tmp_path, config))
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    real = {name: tuple(p.shape) for name, p in model.named_parameters(remove_duplicate=False) if name not in tied}
    assert memory.named_shapes(config) == real


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(REPO)) for p in SHIPPED])
def test_count_matches_for_shipped_configs(path):
    assert memory.count_params(json.loads(path.read_text())) == memory.count_params_meta(str(path))


LLAMA_31 = {  # the published Llama 3.1 shapes, and their published sizes
    8_030_261_248: {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                    "num_attention_heads": 32},
    70_553_706_496: {"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                     "num_attention_heads": 64},
}


@pytest.mark.parametrize("size", LLAMA_31)
def test_llama_31_sizes(size):
    config = transformers.LlamaConfig(vocab_size=128256, num_key_value_heads=8, **LLAMA_31[size]).to_dict()
    count = memory.count_params(config)
    assert count.total == size
    assert count.largest_layer == 128256 * LLAMA_31[size]["hidden_size"]  # the embedding / lm_head


@pytest.mark.parametrize("config", [{"model_type": "gpt2", "n_embd": 768}, {}], ids=["gpt2", "no model_type"])
def test_unknown_architecture(config):
    with pytest.raises(memory.UnknownArchitecture, match="model_type"):
        memory.count_params(config)
    with pytest.raises(memory.UnknownArchitecture):
        memory.linear_module_names(config)


def test_missing_size_is_left_to_the_meta_count():
    config = {"model_type": "llama", **TINY}
    del config["intermediate_size"]
    with pytest.raises(memory.UnknownArchitecture, match="intermediate_size"):
        memory.count_params(config)


@pytest.mark.parametrize("case", SMALL, ids=list(SMALL))
def test_module_names_are_the_models(tmp_path, case):
    config = config_dict(*SMALL[case], "full")
    model = meta_model(write(tmp_path, config))
    leaves = {name.rsplit(".", 1)[-1]: m for name, m in model.named_modules() if name}
    linear = {name for name, m in leaves.items() if isinstance(m, torch.nn.Linear)}
    adaptable = linear | {name for name, m in leaves.items() if isinstance(m, torch.nn.Embedding)}
    assert memory.linear_module_names(config) == linear
    assert memory.lora_targets(config) == adaptable


TOTALS = [1_000_003, 8_000_000_000, 8_030_261_248, 70_000_000_000, 70_553_706_496]
TOPOLOGIES = list(itertools.product([1, 2, 3], [1, 8]))
OFFLOADS = list(itertools.product([False, True], repeat=2))


@pytest.mark.parametrize(("offload_opt", "offload_params"), OFFLOADS)
@pytest.mark.parametrize(("nodes", "gpus"), TOPOLOGIES)
@pytest.mark.parametrize("total", TOTALS)
@pytest.mark.parametrize("stage", [1, 2])
def test_zero2_formula_is_deepspeeds(stage, total, nodes, gpus, offload_opt, offload_params):
    # DeepSpeed's stage 1/2 estimator knows only optimizer offload; parameter offload needs stage 3
    for factor in (1.5, 1.25):
        cpu, gpu = estimate_zero2_model_states_mem_needs(total, gpus, nodes, cpu_offload=offload_opt,
                                                         additional_buffer_factor=factor)
        got = memory.model_states_bytes(memory.ParamCount(total, total // 50), stage, nodes, gpus, offload_opt,
                                        offload_params, factor)
        assert got == (gpu, cpu)
        assert all(type(n) is int for n in got)


@pytest.mark.parametrize(("offload_opt", "offload_params"), OFFLOADS)
@pytest.mark.parametrize(("nodes", "gpus"), TOPOLOGIES)
@pytest.mark.parametrize("total", TOTALS)
def test_zero3_formula_is_deepspeeds(total, nodes, gpus, offload_opt, offload_params):
    largest = total // 37
    for factor in (1.5, 1.25):
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(total, largest, gpus, nodes, cpu_offload=offload_opt,
                                                            cpu_offload_params=offload_params, zero_init=True,
                                                            additional_buffer_factor=factor)
        got = memory.model_states_bytes(memory.ParamCount(total, largest), 3, nodes, gpus, offload_opt,
                                        offload_params, factor)
        assert got == (gpu, cpu)
        assert all(type(n) is int for n in got)


@pytest.mark.parametrize(("nodes", "gpus"), TOPOLOGIES)
def test_stage_0_holds_everything_on_every_device(nodes, gpus):
    device, cpu = memory.model_states_bytes(memory.ParamCount(8_000_000_000, 1), 0, nodes, gpus, False, False)
    assert device == 16 * 8_000_000_000
    assert cpu == int(8_000_000_000 * 4 * gpus * 1.5)


def test_more_devices_need_less_memory_each():
    params = memory.ParamCount(8_000_000_000, 500_000_000)
    per_device = [memory.model_states_bytes(params, stage, 1, gpus, False, False)[0]
                  for stage in (0, 1, 3) for gpus in (1, 8)]
    assert per_device[1] == per_device[0]  # DDP replicates
    assert per_device[3] < per_device[2] and per_device[5] < per_device[4]
    # on one device DeepSpeed's ZeRO figure (20 B/param: it counts fp16 and fp32 grads) exceeds DDP's 16
    assert per_device[3] < per_device[0] and per_device[5] < per_device[0]


@pytest.mark.parametrize(("stage", "nodes", "gpus"), [(4, 1, 1), (-1, 1, 1), (2, 0, 8), (3, 1, 0)])
def test_bad_arguments(stage, nodes, gpus):
    with pytest.raises(ValueError):
        memory.model_states_bytes(memory.ParamCount(10, 1), stage, nodes, gpus, False, False)


@pytest.mark.parametrize(("n", "text"), [(0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"),
                                         (int(15.2 * 2**30), "15.2 GiB"), (3 * 2**40, "3.0 TiB"),
                                         (5000 * 2**40, "5000.0 TiB")])
def test_format_bytes(n, text):
    assert memory.format_bytes(n) == text


def test_import_stays_light():
    code = "import launcher.memory, sys; assert not {'torch', 'transformers', 'deepspeed'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)
