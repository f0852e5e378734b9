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


def linear_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """(out, in) of every adaptable module by its transformers name, lm_head included even when tied (peft adapts
    the module, not the shared tensor); the token embedding as (vocab, hidden)."""
    shapes = {name.rsplit(".", 1)[0]: shape for name, shape in named_shapes(config).items()
              if name.endswith(".weight") and len(shape) == 2}
    shapes.setdefault("lm_head", shapes["model.embed_tokens"])
    return shapes


def lora_params(config: dict, r: int, targets: list[str] | str, modules_to_save: list[str] = ()) -> ParamCount:
    """Trainable parameters peft adds: r x (fan in + fan out) per adapted module (A is r x in, B is out x r; an
    embedding's A/B are r x vocab and hidden x r, the same count), plus full copies of modules_to_save. The largest
    layer is one A or B (each its own module), or a saved copy."""
    shapes = linear_shapes(config)
    if targets == "all-linear":  # peft's all-linear: every nn.Linear but the output layer
        chosen = [n for n in shapes if n != "lm_head" and n.rsplit(".", 1)[-1] in linear_module_names(config)]
    else:
        wanted = [targets] if isinstance(targets, str) else targets
        chosen = [n for n in shapes if any(n == t or n.endswith("." + t) for t in wanted)]
    saved = [n for n in shapes if any(n == t or n.endswith("." + t) for t in modules_to_save)]
    sizes = [r * sum(shapes[n]) for n in chosen] + [math.prod(shapes[n]) for n in saved]
    largest = [r * max(shapes[n]) for n in chosen] + [math.prod(shapes[n]) for n in saved]
    return ParamCount(sum(sizes), max(largest, default=0))


# Bytes per weight of a quantised linear layer, with its constants. NF4 with double quantisation, as modeling.py loads
# it: 4 bits plus one 8-bit absmax per 64-weight block plus one fp32 per 256 blocks (QLoRA paper, Dettmers et al.
# 2023, section 3: 0.127 bits of constants per weight). LLM.int8: one byte plus an fp32 scale per row, ~nothing.
QUANTIZED_BYTES = {"4bit": 0.5 + 1 / 64 + 4 / (64 * 256), "8bit": 1.0}


def frozen_base_bytes(config: dict, dtype_bytes: int, quantize: str = "none") -> int:
    """The frozen base's weights, once: bitsandbytes quantises the decoder's linear layers only; the embedding, norms
    and lm_head stay at the compute dtype."""
    quantized = 0
    if quantize != "none":
        quantized = sum(math.prod(s) for n, s in linear_shapes(config).items() if ".layers." in n)
    rest = count_params(config).total - quantized
    return int(quantized * QUANTIZED_BYTES.get(quantize, dtype_bytes)) + rest * dtype_bytes


def lora_states_bytes(base: ParamCount, base_bytes: int, adapters: ParamCount, stage: int, nodes: int,
                      gpus_per_node: int, offload_optimizer: bool, offload_params: bool,
                      buffer_factor: float = 1.5) -> tuple[int, int]:
    """(accelerator bytes per device, CPU bytes per node) for LoRA: DeepSpeed's figure for the adapters alone (they
    are all that has gradients and Adam states), plus the frozen base held once at its own dtype (`base_bytes`, the
    whole base, quantised or not). ZeRO-1/2 shard only what trains, so every device holds the whole base and every
    rank loads a copy through CPU memory; ZeRO-3 shards the base too and gathers one layer at a time."""
    device, cpu = model_states_bytes(adapters, stage, nodes, gpus_per_node, offload_optimizer,
                                     offload_params, buffer_factor)
    per_param = base_bytes / base.total
    gathered = int(per_param * base.largest_layer)
    if stage < 3:
        return device + base_bytes, cpu + base_bytes * gpus_per_node
    if offload_params:  # the node's shards live in CPU memory; no fp32 copy, so no buffer factor either
        return device + gathered, cpu + base_bytes // nodes
    return device + gathered + base_bytes // (nodes * gpus_per_node), cpu


def activation_bytes(config: dict, micro: int, seq: int, checkpointing: bool, dtype_bytes: int = 2,
                     lora_targets: tuple[str, ...] = (), eager: bool = False) -> int:
    """Activations one device keeps for the backward of one micro batch of `micro` rows of `seq` tokens, for a known
    decoder layout. Per token and layer: the layer input and the two norms' inputs and outputs (4 x hidden), q, k, v
    and the attention output, the MLP's gate, up, activation and product (4 x intermediate); a LoRA dropout keeps a
    copy of each adapted module's input; eager attention adds the heads x seq scores. Gradient checkpointing keeps
    only each layer's input, plus one layer's worth while it is recomputed. The logits (bf16 out, then an fp32 copy
    and its log-softmax for the loss: 10 bytes per entry) come on top."""
    shapes, layers = linear_shapes(config), config["num_hidden_layers"]
    hidden, vocab, heads = config["hidden_size"], config["vocab_size"], config["num_attention_heads"]
    layer0 = {n.split(".layers.0.", 1)[1]: s for n, s in shapes.items() if ".layers.0." in n}
    q_dim = layer0["self_attn.o_proj"][1]
    attention = sum(out for n, (out, _) in layer0.items() if n.startswith("self_attn.") and "o_proj" not in n)
    inter = layer0["mlp.down_proj"][1]
    per_token = 4 * hidden + attention + q_dim + 4 * inter
    per_token += sum(fan_in for n, (_, fan_in) in layer0.items() if n.rsplit(".", 1)[-1] in lora_targets)
    per_layer = micro * seq * per_token * dtype_bytes + (micro * heads * seq * seq * dtype_bytes if eager else 0)
    kept = layers * micro * seq * hidden * dtype_bytes + per_layer if checkpointing else layers * per_layer
    return kept + micro * seq * vocab * 10
