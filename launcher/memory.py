"""Per-device memory of model states (parameters, gradients, optimizer states) at a ZeRO stage, from config.json.

The parameter count is computed from the architecture's numbers, without torch, so `plan` stays instant; the
bytes use the same formulas as DeepSpeed's `estimate_zero2_model_states_mem_needs` and
`estimate_zero3_model_states_mem_needs` (tests check both against a meta-device model and DeepSpeed's functions).
Only the standard library may be imported at module level: importing torch alone takes seconds.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

SIZE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")


class UnknownArchitecture(ValueError):
    """No exact formula for this config: fall back to counting a meta-device model."""


@dataclass(frozen=True)
class ParamCount:
    """Parameters of a model, as DeepSpeed's `model_to_params` counts them."""

    total: int  # shared (tied) parameters once
    largest_layer: int  # most parameters held directly by one module: what ZeRO-3 gathers at once


@dataclass(frozen=True)
class Family:
    """How one decoder-only architecture lays out its parameters; a None bias reads the config key."""

    qkv_bias: bool | None = None  # None: config["attention_bias"], for o_proj too (a fixed one leaves o_proj bare)
    mlp_bias: bool | None = False  # None: config["mlp_bias"]
    qk_norm: bool = False  # an RMSNorm over head_dim on queries and keys
    norms_per_layer: int = 2
    fused: bool = False  # one qkv_proj and one gate_up_proj, as in phi3
    tied: bool = False  # the config class' tie_word_embeddings default
    kv_heads: int | None = None  # the config class' num_key_value_heads default; None: num_attention_heads
    head_dim: int | None = None  # the config class' head_dim default; None: hidden_size // num_attention_heads


# Defaults mirror the transformers config classes so a config.json that leaves a key out counts as it would load.
FAMILIES = {
    "llama": Family(mlp_bias=None),
    "mistral": Family(qkv_bias=False, kv_heads=8),
    "qwen2": Family(qkv_bias=True, kv_heads=32),
    "qwen3": Family(qk_norm=True, kv_heads=32, head_dim=128),
    "gemma": Family(tied=True, kv_heads=16, head_dim=256),
    "gemma2": Family(norms_per_layer=4, tied=True, kv_heads=4, head_dim=256),
    "gemma3_text": Family(qk_norm=True, norms_per_layer=4, tied=True, kv_heads=4, head_dim=256),
    "phi3": Family(qkv_bias=False, fused=True),
}


def family(config: dict) -> Family:
    kind = config.get("model_type")
    if kind not in FAMILIES:
        raise UnknownArchitecture(f"no exact parameter formula for model_type {kind!r} (known: "
                                  f"{', '.join(sorted(FAMILIES))}); count it on the meta device instead")
    return FAMILIES[kind]


def named_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every parameter of a known decoder-only *ForCausalLM by its transformers name, with its shape (a tied lm_head
    is left out: it is the embedding): what plan counts and consolidate checks against, without transformers."""
    fam = family(config)
    if missing := [key for key in SIZE_KEYS if key not in config]:
        raise UnknownArchitecture(f"config.json lacks {', '.join(missing)}; count it on the meta device instead")
    vocab, hidden, inter, layers, heads = (config[key] for key in SIZE_KEYS)
    # a key left out takes the class default; an explicit null is derived from the head count, as on loading
    head_dim = config.get("head_dim", fam.head_dim) or hidden // heads
    q, kv = heads * head_dim, (config.get("num_key_value_heads", fam.kv_heads) or heads) * head_dim
    qkv_bias, o_bias = (bool(config.get("attention_bias")),) * 2 if fam.qkv_bias is None else (fam.qkv_bias, False)
    mlp_bias = bool(config.get("mlp_bias", False)) if fam.mlp_bias is None else fam.mlp_bias
    fused = [("self_attn.qkv_proj", hidden, q + 2 * kv, qkv_bias), ("mlp.gate_up_proj", hidden, 2 * inter, mlp_bias)]
    split = [(f"self_attn.{n}_proj", hidden, size, qkv_bias) for n, size in (("q", q), ("k", kv), ("v", kv))] + [
        (f"mlp.{n}_proj", hidden, inter, mlp_bias) for n in ("gate", "up")]
    layer = {f"{norm}.weight": (hidden,) for norm in NORMS[: fam.norms_per_layer]}  # under model.layers.<i>
    for name, fan_in, fan_out, bias in [*(fused if fam.fused else split), ("self_attn.o_proj", q, hidden, o_bias),
                                        ("mlp.down_proj", inter, hidden, mlp_bias)]:
        layer[f"{name}.weight"] = (fan_out, fan_in)
        if bias:
            layer[f"{name}.bias"] = (fan_out,)
    if fam.qk_norm:
        layer.update({f"self_attn.{n}_norm.weight": (head_dim,) for n in "qk"})
    out = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    out.update({f"model.layers.{i}.{name}": shape for i in range(layers) for name, shape in layer.items()})
    if not config.get("tie_word_embeddings", fam.tied):
        out["lm_head.weight"] = (vocab, hidden)
    return out


def count_params(config: dict) -> ParamCount:
    """Exact parameter count of a known decoder-only transformer from its HF config dict."""
    modules: Counter[str] = Counter()
    for name, shape in named_shapes(config).items():
        modules[name.rsplit(".", 1)[0]] += math.prod(shape)
    return ParamCount(sum(modules.values()), max(modules.values()))


def linear_module_names(config: dict) -> set[str]:
    """Leaf names of the nn.Linear modules of a known architecture, for checking LoRA targets without a model."""
    projections = ("qkv", "gate_up") if family(config).fused else ("q", "k", "v", "gate", "up")
    return {*(f"{p}_proj" for p in projections), "o_proj", "down_proj", "lm_head"}


def lora_targets(config: dict) -> set[str]:
    """Leaf names of the modules peft can adapt: the linear layers and the token embedding."""
    return linear_module_names(config) | {"embed_tokens"}


def count_params_meta(config_path: str) -> ParamCount:
    """The slow, general count: build the model on the meta device (no memory) and count its parameters."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return count_model(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_path)))


def count_model(model) -> ParamCount:
    # parameters() yields a tied weight once; DeepSpeed dedupes by data_ptr, which is 0 for every meta tensor
    total = sum(p.numel() for p in model.parameters())
    return ParamCount(total, max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()))


def model_states_bytes(params: ParamCount, stage: int, nodes: int, gpus_per_node: int, offload_optimizer: bool,
                       offload_params: bool, buffer_factor: float = 1.5) -> tuple[int, int]:
    """(accelerator bytes per device, CPU bytes per node) for params, grads and Adam states, as DeepSpeed estimates
    them (ZeRO-3: with zero.Init, parameters partitioned as they are created)."""
    if nodes < 1 or gpus_per_node < 1:
        raise ValueError(f"need at least one node and one device per node, got {nodes} x {gpus_per_node}")
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage must be 0, 1, 2 or 3, got {stage}")
    total, largest, devices = params.total, params.largest_layer, nodes * gpus_per_node
    if stage == 0:  # plain data parallel: nothing sharded, offload unavailable
        # 2 bf16/fp16 weights + 2 grads + 4 fp32 master weights + 8 Adam moments; every rank loads the fp32 model on CPU
        return 16 * total, int(total * 4 * gpus_per_node * buffer_factor)
    # DeepSpeed's ZeRO-1/2 estimator does not tell stage 1 from 2, and ignores offload_param (stage 3 only)
    if stage < 3 and offload_optimizer:
        return 2 * total, int(total * max(4 * devices, 16) * buffer_factor)
    if stage < 3:  # 18 sharded bytes: 2 fp16 grads + 4 fp32 grads + 4 fp32 master weights + 8 Adam moments
        return 2 * total + int(18 * total / devices), int(total * 4 * gpus_per_node * buffer_factor)
    per_node_share = 1 / nodes  # multiplied, not divided, in the same order as DeepSpeed so int() truncates alike
    if offload_optimizer and offload_params:
        return 4 * largest, int(total * 18 * per_node_share * buffer_factor)
    if offload_optimizer:
        return 4 * largest + int(2 * total / devices), int(total * 16 * per_node_share * buffer_factor)
    # DeepSpeed's estimator has no case for parameters offloaded alone; they count as on the device
    return 4 * largest + int(18 * total / devices), int(largest * 4 * gpus_per_node * buffer_factor)


def format_bytes(n: int) -> str:
    """Human-readable binary size: '512 B', '15.2 GiB'."""
    value, units = n, ["B", "KiB", "MiB", "GiB", "TiB"]
    while value >= 1024 and len(units) > 1:
        value, units = value / 1024, units[1:]
    return f"{n} B" if units[0] == "B" else f"{value:.1f} {units[0]}"
