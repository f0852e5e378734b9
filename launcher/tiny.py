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

STAND_INS = assets.stand_ins()  # package data; recipes/stand-ins in a checkout
# (model_type, vocab_size) -> stand-in tokenizer directory: the family is told apart by its vocabulary
STAND_IN_TOKENIZERS = {("llama", 128256): STAND_INS / "llama-3.1-tokenizer"}
SHAPE = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
         "head_dim": 16}


def tiny_config(config: dict) -> dict:
    """The config shrunk: 2 layers, hidden 64, 4 heads; grouped-query attention kept (fewer KV heads) if it had it."""
    out = dict(config)
    heads = config.get("num_attention_heads", SHAPE["num_attention_heads"])
    kv_heads = config.get("num_key_value_heads", heads)
    out.update(SHAPE)
    out["num_key_value_heads"] = max(1, SHAPE["num_attention_heads"] * kv_heads // heads)
    if isinstance(out.get("layer_types"), list):  # per-layer attention kinds (sliding/full) follow the layer count
        out["layer_types"] = out["layer_types"][: SHAPE["num_hidden_layers"]]
    out.pop("torch_dtype", None)
    out["dtype"] = "float32"
    return out


def build_model(config: dict, seed: int = 0):
    """A randomly initialised (seeded) model of the tiny config, of the class config.json names (a causal LM when it
    names none): an encoder's base model stays one, for the head a classification recipe puts on it."""
    import torch
    import transformers

    settings = tiny_config(config)
    model_type = settings.pop("model_type")
    architecture = (config.get("architectures") or [""])[0]
    cls = getattr(transformers, architecture, None) or transformers.AutoModelForCausalLM
    torch.manual_seed(seed)
    tiny = transformers.AutoConfig.for_model(model_type, **settings)
    if cls is transformers.AutoModelForCausalLM:
        return cls.from_config(tiny, dtype=torch.float32)
    return cls._from_config(tiny, dtype=torch.float32)  # what from_config calls on the class itself


def stand_in_tokenizer(config: dict) -> Path | None:
    return STAND_IN_TOKENIZERS.get((config.get("model_type"), config.get("vocab_size")))


def tokenizer_source(ref: str, config: dict, trust_remote_code: bool = False) -> tuple[object, str | None]:
    """(tokenizer, note): the recipe's tokenizer if it loads without the network, else the family's stand-in, with a
    note saying so."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(ref, local_files_only=True, trust_remote_code=trust_remote_code), None
    except (OSError, ValueError):
        pass
    stand_in = stand_in_tokenizer(config)
    if stand_in is None:
        raise RecipeError(f"--tiny: tokenizer {ref} is not on this machine and there is no stand-in for "
                          f"{config.get('model_type')} models with vocab_size {config.get('vocab_size')}; set "
                          "model.tokenizer to a local tokenizer directory")
    return (AutoTokenizer.from_pretrained(str(stand_in)),
            f"STAND-IN tokenizer {stand_in.name} (recipes/stand-ins: same special tokens, ids and chat template; "
            f"{ref} is not available offline)")


def write(config: dict, tokenizer_ref: str, out: Path, seed: int = 0, trust_remote_code: bool = False):
    """Save the tiny model and its tokenizer into `out` (a model directory the recipe can point at).

    Returns (model parameter count, tokenizer note or None)."""
    from transformers import GenerationConfig

    tokenizer, note = tokenizer_source(tokenizer_ref, config, trust_remote_code)
    model = build_model(config, seed)
    if model.config.vocab_size < max(tokenizer.all_special_ids or [0]) + 1:
        raise RecipeError(f"--tiny: the tokenizer's special ids reach {max(tokenizer.all_special_ids)}, beyond the "
                          f"model's vocab_size {model.config.vocab_size}")
    model.save_pretrained(out)
    GenerationConfig.from_model_config(model.config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return sum(p.numel() for p in model.parameters()), note
