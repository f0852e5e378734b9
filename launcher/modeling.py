"""Tokenizer, model and LoRA config from the recipe, via transformers' Auto classes and peft."""

from __future__ import annotations

from launcher.errors import RecipeError
from launcher.schema import Recipe


def load_tokenizer(recipe: Recipe):
    from transformers import AutoTokenizer

    m = recipe.model
    tokenizer = AutoTokenizer.from_pretrained(m.tokenizer or m.name_or_path, trust_remote_code=m.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(recipe: Recipe, on_gpu: bool):
    """Build the model. Call after the SFTConfig exists: under ZeRO-3 the weights are partitioned as they load."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    m = recipe.model
    kwargs = {"trust_remote_code": m.trust_remote_code}
    if m.attn_implementation:
        kwargs["attn_implementation"] = m.attn_implementation
    dtype = "auto" if m.dtype == "auto" else getattr(torch, m.dtype)
    if m.init == "random":
        config = AutoConfig.from_pretrained(m.config or m.name_or_path, trust_remote_code=m.trust_remote_code)
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32 if dtype == "auto" else dtype, **kwargs)
    quantization = _quantization(recipe, on_gpu)
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    return AutoModelForCausalLM.from_pretrained(m.name_or_path, dtype=dtype, **kwargs)


def _quantization(recipe: Recipe, on_gpu: bool):
    if not recipe.lora or recipe.lora.quantize == "none":
        return None
    if not on_gpu:
        raise RecipeError(f"lora.quantize {recipe.lora.quantize} (QLoRA) needs a CUDA GPU (bitsandbytes); "
                          "set lora.quantize: none for a CPU run")
    import torch
    from transformers import BitsAndBytesConfig

    if recipe.lora.quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def lora_config(recipe: Recipe, model, where: str):
    """peft's LoraConfig, after checking every named target against the model's modules."""
    if recipe.lora is None:
        return None
    from peft import LoraConfig

    lora = recipe.lora
    names = [name for name, _ in model.named_modules()]
    targets = [lora.target_modules] if isinstance(lora.target_modules, str) else lora.target_modules
    for key, wanted in (("target_modules", targets), ("modules_to_save", lora.modules_to_save)):
        for target in wanted:
            if target != "all-linear" and not any(n == target or n.endswith("." + target) for n in names):
                raise RecipeError(f"{where}: lora.{key} '{target}' matches no module of the model; it has "
                                  f"{', '.join(linear_names(model))}")
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, task_type="CAUSAL_LM",
                      target_modules=lora.target_modules, modules_to_save=lora.modules_to_save or None)


def linear_names(model) -> list[str]:
    import torch

    return sorted({name.rsplit(".", 1)[-1] for name, mod in model.named_modules()
                   if isinstance(mod, torch.nn.Linear)})
