"""Per-device memory of model states (parameters, gradients, optimizer states) at a ZeRO stage, from config.json.

The parameter count is computed from the architecture's numbers, without torch, so `plan` stays instant; the
bytes use the same formulas as DeepSpeed's `estimate_zero2_model_states_mem_needs` and
`estimate_zero3_model_states_mem_needs` (tests check both against a meta-device model and DeepSpeed's functions).
Only the standard library may be imported at module level: importing torch alone takes seconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SIZE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


class UnknownArchitecture(ValueError):
    """No exact formula for this config: fall back to counting a meta-device model."""


@dataclass(frozen=True)
class ParamCount:
    """Parameters of a model, as DeepSpeed's `model_to_params` counts them."""

    total: int  # shared (tied) parameters once
    largest_layer: int  # most parameters held directly by one module: what ZeRO-3 gathers at once


@dataclass(frozen=True)
class Family:
    """How one decoder-only architecture lays out its parameters; None reads the config key of the same name."""

    qkv_bias: bool | None = None  # None: config["attention_bias"]
    o_bias: bool | None = None
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
    "mistral": Family(qkv_bias=False, o_bias=False, kv_heads=8),
    "qwen2": Family(qkv_bias=True, o_bias=False, kv_heads=32),
    "qwen3": Family(qk_norm=True, kv_heads=32, head_dim=128),
    "gemma": Family(tied=True, kv_heads=16, head_dim=256),
    "gemma2": Family(norms_per_layer=4, tied=True, kv_heads=4, head_dim=256),
    "gemma3_text": Family(qk_norm=True, norms_per_layer=4, tied=True, kv_heads=4, head_dim=256),
    "phi3": Family(qkv_bias=False, o_bias=False, fused=True),
}


def family(config: dict) -> Family:
    """The layout of config's model_type, or UnknownArchitecture."""
    kind = config.get("model_type")
    if kind not in FAMILIES:
        raise UnknownArchitecture(f"no exact parameter formula for model_type {kind!r} (known: "
                                  f"{', '.join(sorted(FAMILIES))}); count it on the meta device instead")
    return FAMILIES[kind]


def _flag(fixed: bool | None, config: dict, key: str) -> bool:
    """A bias switch: fixed by the architecture, or read from the config."""
    return bool(config.get(key, False)) if fixed is None else fixed


def _linear(name: str, fan_in: int, fan_out: int, bias: bool) -> dict[str, tuple[int, ...]]:
    """The parameters of one nn.Linear, by name."""
    return {f"{name}.weight": (fan_out, fan_in), **({f"{name}.bias": (fan_out,)} if bias else {})}


NORMS = {2: ("input_layernorm", "post_attention_layernorm"),
         4: ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")}


def _layer(config: dict, fam: Family, prefix: str) -> dict[str, tuple[int, ...]]:
    """Names and shapes of one decoder layer's parameters, as the transformers model names them."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads = config["num_attention_heads"]
    # a key left out takes the class default; an explicit null is derived from the head count, as on loading
    kv_heads = config.get("num_key_value_heads", fam.kv_heads) or heads
    head_dim = config.get("head_dim", fam.head_dim) or hidden // heads
    qkv_bias, o_bias = _flag(fam.qkv_bias, config, "attention_bias"), _flag(fam.o_bias, config, "attention_bias")
    mlp_bias = _flag(fam.mlp_bias, config, "mlp_bias")
    q, kv = heads * head_dim, kv_heads * head_dim
    attn, mlp = f"{prefix}.self_attn", f"{prefix}.mlp"
    if fam.fused:
        out = {**_linear(f"{attn}.qkv_proj", hidden, q + 2 * kv, qkv_bias),
               **_linear(f"{mlp}.gate_up_proj", hidden, 2 * inter, mlp_bias)}
    else:
        out = {**_linear(f"{attn}.q_proj", hidden, q, qkv_bias), **_linear(f"{attn}.k_proj", hidden, kv, qkv_bias),
               **_linear(f"{attn}.v_proj", hidden, kv, qkv_bias),
               **_linear(f"{mlp}.gate_proj", hidden, inter, mlp_bias), **_linear(f"{mlp}.up_proj", hidden, inter,
                                                                                 mlp_bias)}
    out.update({**_linear(f"{attn}.o_proj", q, hidden, o_bias), **_linear(f"{mlp}.down_proj", inter, hidden, mlp_bias)})
    out.update({f"{prefix}.{norm}.weight": (hidden,) for norm in NORMS[fam.norms_per_layer]})
    if fam.qk_norm:
        out.update({f"{attn}.q_norm.weight": (head_dim,), f"{attn}.k_norm.weight": (head_dim,)})
    return out


def named_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every parameter of a known decoder-only *ForCausalLM, by its transformers name, with its shape; a tied
    lm_head is left out (it is the embedding). What plan counts and consolidation checks checkpoints against,
    without importing transformers. Raises UnknownArchitecture for other models."""
    fam = family(config)
    missing = [key for key in SIZE_KEYS if key not in config]
    if missing:
        raise UnknownArchitecture(f"config.json lacks {', '.join(missing)}; count it on the meta device instead")
    vocab, hidden = config["vocab_size"], config["hidden_size"]
    out = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(config["num_hidden_layers"]):
        out.update(_layer(config, fam, f"model.layers.{i}"))
    out["model.norm.weight"] = (hidden,)
    if not config.get("tie_word_embeddings", fam.tied):
        out["lm_head.weight"] = (vocab, hidden)
    return out


def count_params(config: dict) -> ParamCount:
    """Exact parameter count of a known decoder-only transformer from its HF config dict."""
    modules: dict[str, int] = {}
    for name, shape in named_shapes(config).items():
        module = name.rsplit(".", 1)[0]
        modules[module] = modules.get(module, 0) + math.prod(shape)
    return ParamCount(sum(modules.values()), max(modules.values()))


def linear_module_names(config: dict) -> set[str]:
    """Leaf names of the nn.Linear modules of a known architecture, for checking LoRA targets without a model."""
    if family(config).fused:
        return {"qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head"}
    return {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"}


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
    """The count of a built (e.g. meta-device) model."""
    # parameters() yields a tied weight once; DeepSpeed dedupes by data_ptr, which is 0 for every meta tensor
    total = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return ParamCount(total, largest)


def model_states_bytes(params: ParamCount, stage: int, nodes: int, gpus_per_node: int, offload_optimizer: bool,
                       offload_params: bool, buffer_factor: float = 1.5) -> tuple[int, int]:
    """(accelerator bytes per device, CPU bytes per node) for params, grads and Adam states, as DeepSpeed estimates."""
    if nodes < 1 or gpus_per_node < 1:
        raise ValueError(f"need at least one node and one device per node, got {nodes} x {gpus_per_node}")
    if stage == 0:
        return _ddp(params.total, gpus_per_node, buffer_factor)
    if stage in (1, 2):  # DeepSpeed has no parameter offload below stage 3: offload_param is ignored there
        return _zero2(params.total, nodes, gpus_per_node, offload_optimizer, buffer_factor)
    if stage == 3:
        return _zero3(params, nodes, gpus_per_node, offload_optimizer, offload_params, buffer_factor)
    raise ValueError(f"ZeRO stage must be 0, 1, 2 or 3, got {stage}")


def _ddp(total: int, per_node: int, buffer_factor: float) -> tuple[int, int]:
    """Plain data parallel: nothing sharded, offload unavailable."""
    # 2 bf16/fp16 weights + 2 grads + 4 fp32 master weights + 8 Adam moments; every rank loads the fp32 model on CPU
    return 16 * total, int(total * 4 * per_node * buffer_factor)


def _zero2(total: int, nodes: int, per_node: int, offload_optimizer: bool, buffer_factor: float) -> tuple[int, int]:
    """DeepSpeed's ZeRO-1/2 estimate (its estimator does not tell stage 1 from stage 2)."""
    devices = nodes * per_node
    if offload_optimizer:
        return 2 * total, int(total * max(4 * devices, 16) * buffer_factor)
    # 18 sharded bytes: 2 fp16 grads + 4 fp32 grads + 4 fp32 master weights + 8 Adam moments
    return 2 * total + int(18 * total / devices), int(total * 4 * per_node * buffer_factor)


def _zero3(params: ParamCount, nodes: int, per_node: int, offload_optimizer: bool, offload_params: bool,
           buffer_factor: float) -> tuple[int, int]:
    """DeepSpeed's ZeRO-3 estimate with zero.Init (parameters partitioned as they are created)."""
    total, devices = params.total, nodes * per_node
    layer = 4 * params.largest_layer
    per_node_share = 1 / nodes  # multiplied, not divided, in the same order as DeepSpeed so int() truncates alike
    if offload_optimizer and offload_params:
        return layer, int(total * 18 * per_node_share * buffer_factor)
    if offload_optimizer:
        return layer + int(2 * total / devices), int(total * 16 * per_node_share * buffer_factor)
    # DeepSpeed's estimator has no case for parameters offloaded alone; they count as on the device
    return layer + int(18 * total / devices), int(params.largest_layer * 4 * per_node * buffer_factor)


def format_bytes(n: int) -> str:
    """Human-readable binary size: '512 B', '15.2 GiB'."""
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{value:.1f} {unit}"
