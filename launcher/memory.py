"""Per-device memory of model states (parameters, gradients, optimizer states) at a ZeRO stage, from config.json.

The parameter count is computed from the architecture's numbers, without torch, so `plan` stays instant; the
bytes use the same formulas as DeepSpeed's `estimate_zero2_model_states_mem_needs` and
`estimate_zero3_model_states_mem_needs` (a test checks both against the real model and DeepSpeed's functions).
"""

from __future__ import annotations

from dataclasses import dataclass

DECODERS = {"llama", "mistral", "qwen2", "qwen3"}
QKV_BIAS = {"qwen2"}  # q/k/v projections always carry a bias in these families
QK_NORM = {"qwen3"}
DEFAULT_HEAD_DIM = {"qwen3": 128}  # when config.json leaves it out, the config class' default


class UnknownArchitecture(ValueError):
    """No exact formula for this model_type: fall back to counting a meta-device model."""


@dataclass(frozen=True)
class ParamCount:
    total: int
    largest_layer: int  # most parameters held directly by one module: what ZeRO-3 gathers at once


def count_params(config: dict) -> ParamCount:
    """Exact parameter count of a decoder-only transformer from its HF config."""
    kind = config.get("model_type")
    if kind not in DECODERS:
        raise UnknownArchitecture(f"no parameter formula for model_type {kind!r}")
    hidden, vocab, inter = config["hidden_size"], config["vocab_size"], config["intermediate_size"]
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    head_dim = config.get("head_dim") or DEFAULT_HEAD_DIM.get(kind) or hidden // heads
    attn_bias = bool(config.get("attention_bias", False))
    qkv_bias, mlp_bias = attn_bias or kind in QKV_BIAS, bool(config.get("mlp_bias", False))
    modules = {
        "q_proj": hidden * heads * head_dim + qkv_bias * heads * head_dim,
        "kv_proj": hidden * kv_heads * head_dim + qkv_bias * kv_heads * head_dim,
        "o_proj": heads * head_dim * hidden + attn_bias * hidden,
        "mlp_in": hidden * inter + mlp_bias * inter,
        "mlp_out": inter * hidden + mlp_bias * hidden,
    }
    per_layer = (modules["q_proj"] + 2 * modules["kv_proj"] + modules["o_proj"] + 2 * modules["mlp_in"]
                 + modules["mlp_out"] + 2 * hidden + (2 * head_dim if kind in QK_NORM else 0))
    embeddings = vocab * hidden
    tied = bool(config.get("tie_word_embeddings", False))
    total = embeddings * (1 if tied else 2) + config["num_hidden_layers"] * per_layer + hidden
    return ParamCount(total, max(embeddings, *modules.values()))


def lora_targets(config: dict) -> set[str]:
    """Leaf names of the modules peft can adapt (linear layers, embeddings), checked before any model is built."""
    if config.get("model_type") not in DECODERS:
        raise UnknownArchitecture(f"no module list for model_type {config.get('model_type')!r}")
    return {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head", "embed_tokens"}


def count_params_meta(config_path: str) -> ParamCount:
    """The slow, general count: build the model on the meta device (no memory) and count its parameters."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(config_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())  # parameters() lists a tied weight once
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return ParamCount(total, largest)


def model_states_bytes(params: ParamCount, stage: int, nodes: int, gpus_per_node: int, offload_optimizer: bool,
                       offload_params: bool, buffer_factor: float = 1.5) -> tuple[int, int]:
    """(bytes per device, CPU bytes per node) for params, grads and Adam states, as DeepSpeed estimates them."""
    p, gpus = params.total, nodes * gpus_per_node
    if stage == 3:
        return _zero3(p, params.largest_layer, nodes, gpus, gpus_per_node, offload_optimizer, offload_params,
                      buffer_factor)
    if stage == 0:  # nothing sharded: every device holds what ZeRO-2 would spread over all of them
        gpus = 1
    if offload_optimizer:
        return 2 * p, int(p * max(4 * gpus, 16) * buffer_factor)
    # 2 bytes fp16/bf16 params + 18 bytes of grads, fp32 master weights and Adam moments, sharded over the devices
    return 2 * p + int(18 * p / gpus), int(p * 4 * gpus_per_node * buffer_factor)


def _zero3(p: int, largest: int, nodes: int, gpus: int, per_node: int, offload_optimizer: bool,
           offload_params: bool, buffer_factor: float) -> tuple[int, int]:
    layer = 4 * largest  # a gathered layer, in fp32
    if offload_optimizer and offload_params:
        return layer, int(p * 18 / nodes * buffer_factor)
    if offload_optimizer:
        return layer + int(2 * p / gpus), int(p * 16 / nodes * buffer_factor)
    return layer + int(18 * p / gpus), int(largest * 4 * per_node * buffer_factor)


def format_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{int(value)} B"
        value /= 1024
    raise AssertionError("unreachable")
