"""The memory estimate: exact parameter counts without torch, and DeepSpeed's own formulas."""

from __future__ import annotations

import itertools
import json
import re
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


# --- LoRA and QLoRA: a frozen base, trainable adapters; activations (issue 14, item 7)
LORA_CASES = {"llama GQA, attention + MLP": ("llama untied, GQA", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                   "up_proj", "down_proj"], []),
              "llama tied, all-linear": ("llama tied, biases", "all-linear", []),
              "qwen2, embedding adapted, lm_head saved": ("qwen2 untied", ["q_proj", "embed_tokens"], ["lm_head"]),
              "phi3 fused": ("phi3 GQA", ["qkv_proj", "down_proj"], [])}


@pytest.mark.parametrize("case", LORA_CASES, ids=list(LORA_CASES))
def test_adapter_count_is_pefts(tmp_path, case):
    from peft import LoraConfig, get_peft_model

    small, targets, saved = LORA_CASES[case]
    config = config_dict(*SMALL[small], "full")
    model = get_peft_model(meta_model(write(tmp_path, config)), LoraConfig(
        r=4, target_modules=targets, modules_to_save=saved or None, task_type="CAUSAL_LM"))
    trainable = [(n, p.numel()) for n, p in model.named_parameters() if p.requires_grad]
    got = memory.lora_params(config, 4, targets, saved)
    assert got.total == sum(n for _, n in trainable)
    assert got.largest_layer == max(n for _, n in trainable)


def llama_31(size: int) -> dict:
    return transformers.LlamaConfig(vocab_size=128256, num_key_value_heads=8, **LLAMA_31[size]).to_dict()


SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_adapter_count_by_hand():
    # 70B, r 16, per layer: q, o 16 x (8192 + 8192); k, v 16 x (8192 + 1024); gate, up, down 16 x (8192 + 28672)
    per_layer = 2 * 16 * 16384 + 2 * 16 * 9216 + 3 * 16 * 36864
    assert per_layer == 2_588_672
    assert memory.lora_params(llama_31(70_553_706_496), 16, SEVEN).total == 80 * per_layer == 207_093_760


def test_frozen_base_by_hand():
    config = llama_31(8_030_261_248)
    assert memory.frozen_base_bytes(config, 2) == 2 * 8_030_261_248
    embeddings = 2 * 128256 * 4096  # embedding and lm_head stay 16-bit under bitsandbytes, so do the norms
    norms = (2 * 32 + 1) * 4096
    linear = 8_030_261_248 - embeddings - norms
    # NF4 + double quantisation: 4 bits, an 8-bit absmax per 64 weights, an fp32 per 256 blocks
    quantized = int(linear * (0.5 + 1 / 64 + 1 / 4096))
    assert memory.frozen_base_bytes(config, 2, "4bit") == quantized + 2 * (embeddings + norms)
    assert memory.frozen_base_bytes(config, 2, "8bit") == linear + 2 * (embeddings + norms)


@pytest.mark.parametrize(("offload_opt", "offload_params"), OFFLOADS)
@pytest.mark.parametrize(("nodes", "gpus"), TOPOLOGIES)
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_lora_states_are_deepspeeds_for_the_adapters_plus_the_base(stage, nodes, gpus, offload_opt, offload_params):
    """DeepSpeed's estimators, fed only the adapters (all that has gradients and Adam states), plus the frozen bf16
    base: whole on every device at ZeRO-1/2, sharded at ZeRO-3 with one layer gathered, or on the CPU offloaded."""
    base, adapters = memory.ParamCount(70_553_706_496, 1_050_673_152), memory.ParamCount(207_093_760, 458_752)
    if stage == 3:
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(adapters.total, adapters.largest_layer, gpus, nodes,
                                                            cpu_offload=offload_opt, cpu_offload_params=offload_params,
                                                            zero_init=True, additional_buffer_factor=1.5)
    else:
        cpu, gpu = estimate_zero2_model_states_mem_needs(adapters.total, gpus, nodes, cpu_offload=offload_opt,
                                                         additional_buffer_factor=1.5)
    device, host = memory.lora_states_bytes(base, 2 * base.total, adapters, stage, nodes, gpus, offload_opt,
                                            offload_params)
    if stage < 3:
        assert (device - gpu, host - cpu) == (2 * base.total, 2 * base.total * gpus)
    elif offload_params:
        assert (device - gpu, host - cpu) == (2 * base.largest_layer, 2 * base.total // nodes)
    else:
        assert (device - gpu, host - cpu) == (2 * base.largest_layer + 2 * base.total // (nodes * gpus), 0)


def test_70b_lora_recipe_is_near_the_frozen_base():
    """The 70B LoRA recipe on 4 nodes x 8 with parameters offloaded: the bf16 base, a quarter per node, is 35.3 GB;
    the adapters' offloaded fp32 weights and Adam states add ~1.4 GB. It said 443.5 GiB before (the full fine-tune
    figure). Without offload (the recipe's own zero3), each GPU holds a 32nd of the base plus the adapters' states."""
    from tests.helpers import cli

    frozen = 2 * 70_553_706_496
    result = cli("plan", "recipes/llama-3.1-70b/lora.yaml", "--nnodes", 4, "--nproc_per_node", 8,
                 "--deepspeed.config=zero3_offload", "--format", "json")
    assert result.returncode == 0, result.stderr
    offloaded = json.loads(result.stdout)
    cpu = float(re.search(r"and ([\d.]+) GiB CPU per node", offloaded["memory"]).group(1)) * 2**30
    assert frozen / 4 < cpu < 1.1 * frozen / 4
    result = cli("plan", "recipes/llama-3.1-70b/lora.yaml", "--nnodes", 4, "--nproc_per_node", 8, "--format", "json")
    plan = json.loads(result.stdout)
    device = float(re.search(r"([\d.]+) GiB per device", plan["memory"]).group(1)) * 2**30
    adapters = 207_093_760 * (4 + 4 + 8) / 32  # fp32 weights, gradients and Adam states, sharded
    assert frozen / 32 + adapters < device < 1.6 * (frozen / 32 + adapters)  # plus a gathered layer and buffers
    assert "207.1 M trainable adapter params" in plan["memory"]
    assert "GiB per device for micro batch 1 x 4096 tokens, gradient checkpointing" in plan["activations"]


ACT_CONFIG = {"model_type": "llama", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 176,
              "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2}


def test_activations_by_hand():
    # per token and layer: 4 x 64 (input, norms) + 64 + 2 x 32 (q, k, v) + 64 (attention out) + 4 x 176 (MLP)
    per_token = 4 * 64 + 64 + 2 * 32 + 64 + 4 * 176
    tokens = 2 * 100
    logits = tokens * 512 * 10
    assert memory.activation_bytes(ACT_CONFIG, 2, 100, False) == 3 * tokens * per_token * 2 + logits
    assert memory.activation_bytes(ACT_CONFIG, 2, 100, True) == 3 * tokens * 64 * 2 + tokens * per_token * 2 + logits
    # a LoRA dropout copies q/k/v's input (64) three times; eager attention keeps 4 heads x 100 x 100 scores a row
    lora = memory.activation_bytes(ACT_CONFIG, 2, 100, False, lora_targets=("q_proj", "k_proj", "v_proj"))
    assert lora - memory.activation_bytes(ACT_CONFIG, 2, 100, False) == 3 * tokens * 3 * 64 * 2
    eager = memory.activation_bytes(ACT_CONFIG, 2, 100, False, eager=True)
    assert eager - memory.activation_bytes(ACT_CONFIG, 2, 100, False) == 3 * 2 * 4 * 100 * 100 * 2


def saved_for_backward(model, micro: int, seq: int) -> int:
    """Bytes autograd keeps for the backward of one bf16 training forward (weights left out), by saved-tensor hooks:
    a measurement that needs no GPU and does not depend on the allocator."""
    weights, saved = {p.data_ptr() for p in model.parameters()}, {}

    def pack(t):
        if t.data_ptr() not in weights:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(0, ACT_CONFIG["vocab_size"], (micro, seq), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids)
    return sum(saved.values())


@pytest.mark.parametrize(("micro", "seq"), [(2, 64), (4, 128)])
def test_activations_against_a_measurement(micro, seq):
    """Against what a tiny bf16 Llama really saves: within 1.25x without checkpointing. With it, the forward keeps
    only layer inputs and the loss's tensors; the backward then recomputes one layer, so the estimate lies between
    that and the whole. (The dry run's "memory" stage measures peak RSS, ~2.7 GiB of it the imported libraries, so it
    cannot check a figure of a few MB.)"""
    config = transformers.LlamaConfig(**{k: v for k, v in ACT_CONFIG.items() if k != "model_type"},
                                      attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16).train()
    full = saved_for_backward(model, micro, seq)
    assert full / 1.25 < memory.activation_bytes(ACT_CONFIG, micro, seq, False) < 1.25 * full
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed = saved_for_backward(model, micro, seq)
    assert checkpointed < memory.activation_bytes(ACT_CONFIG, micro, seq, True) < full
