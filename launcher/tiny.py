"""`--tiny`: the recipe's model at a toy size, for dry runs without the weights (or the GPUs) of the real one.

Same model_type and architectures, same vocab_size and special token ids, same module names (so LoRA targets and
ZeRO settings still apply); 2 layers of width 64, random weights seeded. Built from the recipe's config.json. The
tokenizer is the recipe's when it is on this machine (a local directory or the hub cache), else a stand-in shipped
in recipes/stand-ins/ with the family's special tokens at their real ids and its chat template.
"""

from __future__ import annotations

from pathlib import Path

from launcher import assets
from launcher.errors import RecipeError

# (model_type, vocab_size) -> stand-in tokenizer directory (package data; recipes/stand-ins in a checkout): the
# family is told apart by its vocabulary
STAND_IN_TOKENIZERS = {("llama", 128256): assets.stand_ins() / "llama-3.1-tokenizer"}
SHAPE = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
         "head_dim": 16}


def build_model(config: dict, seed: int = 0):
    """A randomly initialised (seeded) model of the config shrunk to SHAPE (grouped-query attention kept, with fewer
    KV heads, if it had it), of the class config.json names (a causal LM when it names none): an encoder's base model
    stays one, for the head a classification recipe puts on it."""
    import torch
    import transformers

    heads = config.get("num_attention_heads", SHAPE["num_attention_heads"])
    kv_heads = config.get("num_key_value_heads", heads)
    settings = {**{k: v for k, v in config.items() if k not in ("model_type", "torch_dtype")}, **SHAPE,
                "num_key_value_heads": max(1, SHAPE["num_attention_heads"] * kv_heads // heads), "dtype": "float32"}
    if isinstance(settings.get("layer_types"), list):  # per-layer attention kinds (sliding/full) follow layer count
        settings["layer_types"] = settings["layer_types"][: SHAPE["num_hidden_layers"]]
    cls = getattr(transformers, (config.get("architectures") or [""])[0], None) or transformers.AutoModelForCausalLM
    torch.manual_seed(seed)
    tiny = transformers.AutoConfig.for_model(config["model_type"], **settings)
    build = cls.from_config if cls is transformers.AutoModelForCausalLM else cls._from_config
    return build(tiny, dtype=torch.float32)  # _from_config: what from_config calls on the class itself


def stand_in_tokenizer(config: dict) -> Path | None:
    return STAND_IN_TOKENIZERS.get((config.get("model_type"), config.get("vocab_size")))


def write(config: dict, tokenizer_ref: str, out: Path, seed: int = 0, trust_remote_code: bool = False):
    """Save the tiny model and its tokenizer into `out` (a model directory the recipe can point at): the recipe's
    tokenizer if it loads without the network, else the family's stand-in. Returns (model parameter count, a note
    on the stand-in or None)."""
    from transformers import AutoTokenizer, GenerationConfig

    note = None
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_ref, local_files_only=True,
                                                  trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        stand_in = stand_in_tokenizer(config)
        if stand_in is None:
            raise RecipeError(f"--tiny: tokenizer {tokenizer_ref} is not on this machine and there is no stand-in for "
                              f"{config.get('model_type')} models with vocab_size {config.get('vocab_size')}; set "
                              "model.tokenizer to a local tokenizer directory") from None
        tokenizer = AutoTokenizer.from_pretrained(str(stand_in))
        note = (f"STAND-IN tokenizer {stand_in.name} (recipes/stand-ins: same special tokens, ids and chat template; "
                f"{tokenizer_ref} is not available offline)")
    model = build_model(config, seed)
    if model.config.vocab_size < max(tokenizer.all_special_ids or [0]) + 1:
        raise RecipeError(f"--tiny: the tokenizer's special ids reach {max(tokenizer.all_special_ids)}, beyond the "
                          f"model's vocab_size {model.config.vocab_size}")
    model.save_pretrained(out)
    GenerationConfig.from_model_config(model.config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return sum(p.numel() for p in model.parameters()), note
