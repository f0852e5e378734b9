"""Tokenizer, model and LoRA config from the recipe, via transformers' Auto classes and peft."""

from __future__ import annotations

import json
from pathlib import Path

from launcher.errors import RecipeError
from launcher.schema import Recipe

GENERIC_TOKENIZERS = ("TokenizersBackend", "PreTrainedTokenizerFast")  # one class in transformers 5


def load_tokenizer(recipe: Recipe, local_files_only: bool = False, quick: bool = False):
    """The recipe's tokenizer (model.tokenizer, else the model's). local_files_only: no download (hub cache only).
    quick (pre-flight): a local tokenizer whose files declare transformers' generic class is loaded with that class
    directly; AutoTokenizer returns the same class for them but first imports torch and the model's config classes
    (about 4 s). Chat templates, special tokens and assistant masks are the same either way."""
    m = recipe.model
    ref = m.tokenizer or m.name_or_path
    if quick and _declares_generic_class(ref):
        from transformers import TokenizersBackend

        tokenizer = TokenizersBackend.from_pretrained(ref, local_files_only=True)
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(ref, trust_remote_code=m.trust_remote_code,
                                                  local_files_only=local_files_only)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _declares_generic_class(ref: str) -> bool:
    directory = Path(ref)
    try:
        config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return ((directory / "tokenizer.json").is_file() and isinstance(config, dict) and "auto_map" not in config
            and config.get("tokenizer_class") in GENERIC_TOKENIZERS)


# Each task's Auto class, and the architecture-name suffix that marks a saved model of that task.
AUTO_CLASSES = {"sft": "AutoModelForCausalLM", "classification": "AutoModelForSequenceClassification",
                "regression": "AutoModelForSequenceClassification",
                "token_classification": "AutoModelForTokenClassification",
                "question_answering": "AutoModelForQuestionAnswering"}
SUFFIXES = {"ForSequenceClassification": "classification", "ForTokenClassification": "token_classification",
            "ForQuestionAnswering": "question_answering"}
HEAD_NAMES = ("classifier", "score", "qa_outputs")  # the new heads' module names in transformers' models
# peft's task types: each wraps the model so that the new head trains in full (modules_to_save)
PEFT_TASKS = {"sft": "CAUSAL_LM", "classification": "SEQ_CLS", "regression": "SEQ_CLS",
              "token_classification": "TOKEN_CLS", "question_answering": "QUESTION_ANS"}


def auto_class(task: str):
    import transformers

    return getattr(transformers, AUTO_CLASSES[task])


def task_of(config: dict) -> str:
    """The task of a saved model, from the architecture its config.json names: sft for a causal LM."""
    architecture = (config.get("architectures") or [""])[0]
    task = next((t for suffix, t in SUFFIXES.items() if architecture.endswith(suffix)), "sft")
    if task == "classification" and (config.get("problem_type") == "regression" or config.get("num_labels") == 1):
        return "regression"
    return task


def is_classifier(config: dict) -> bool:
    """Whether a saved model's config.json names a task head (it predicts labels, spans or numbers, not text)."""
    return task_of(config) != "sft"


def auto_class_for(config: dict):
    """The Auto class that builds a saved model, from the architecture its config.json names."""
    return auto_class(task_of(config))


# in a head model's config.json: the length its rows were truncated to in training, so `launcher evaluate` reads
# them as the trainer did (a pretrained tokenizer's model_max_length, 512 for BERT, is often longer)
LENGTH_KEY = "trained_max_length"


def head_config(task: str, labels: list[str]) -> dict:
    """What a task's new head puts in the model's config: its labels (id2label), or one output for regression."""
    if task in ("classification", "token_classification"):
        return {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
                "label2id": {name: i for i, name in enumerate(labels)}}
    if task == "regression":
        return {"num_labels": 1, "problem_type": "regression"}
    return {}


def model_config(recipe: Recipe):
    from transformers import AutoConfig

    m = recipe.model
    config = AutoConfig.from_pretrained(m.config or m.name_or_path, trust_remote_code=m.trust_remote_code)
    config.update(head_config(recipe.task, recipe.head.labels))
    return config


def meta_model(recipe: Recipe):
    """The task's model on the meta device: every parameter's name and shape, no memory, no weights."""
    import torch

    with torch.device("meta"):
        return auto_class(recipe.task).from_config(model_config(recipe),
                                                   trust_remote_code=recipe.model.trust_remote_code)


def load_model(recipe: Recipe, on_gpu: bool):
    """Build the model. Call after the SFTConfig exists: under ZeRO-3 the weights are partitioned as they load."""
    import torch

    m = recipe.model
    cls = auto_class(recipe.task)
    kwargs = {"trust_remote_code": m.trust_remote_code}
    if m.attn_implementation:
        kwargs["attn_implementation"] = m.attn_implementation
    dtype = "auto" if m.dtype == "auto" else getattr(torch, m.dtype)
    if m.init == "random":
        return cls.from_config(model_config(recipe), dtype=torch.float32 if dtype == "auto" else dtype, **kwargs)
    if recipe.lora and recipe.lora.quantize != "none":
        if not on_gpu:
            raise RecipeError(f"lora.quantize {recipe.lora.quantize} (QLoRA) needs a CUDA GPU (bitsandbytes); "
                              "set lora.quantize: none for a CPU run")
        kwargs["quantization_config"] = quantization_config(recipe)
    head = head_config(recipe.task, recipe.head.labels)
    return cls.from_pretrained(m.name_or_path, dtype=dtype, **head, **kwargs)


def quantization_config(recipe: Recipe):
    """QLoRA's BitsAndBytesConfig. The 4-bit layers compute in the training precision (recipe.training holds it as
    ds_config.resolve settled it): bf16 compute under fp16 would need bf16 hardware the fp16 choice says is absent."""
    import torch
    from transformers import BitsAndBytesConfig

    if recipe.lora.quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    t = recipe.training
    compute = torch.bfloat16 if t.get("bf16") else torch.float16 if t.get("fp16") else torch.float32
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute)


def lora_config(recipe: Recipe, model, where: str):
    """peft's LoraConfig, after checking every named target against the model's modules."""
    lora = recipe.lora
    if lora is None:
        return None
    import torch
    from peft import LoraConfig

    modules = dict(model.named_modules())
    targets = [lora.target_modules] if isinstance(lora.target_modules, str) else lora.target_modules
    for key, wanted in (("target_modules", targets), ("modules_to_save", lora.modules_to_save)):
        for target in wanted:
            if target != "all-linear" and not any(n == target or n.endswith("." + target) for n in modules):
                linear = {n.rsplit(".", 1)[-1] for n, mod in modules.items() if isinstance(mod, torch.nn.Linear)}
                raise RecipeError(f"{where}: lora.{key} '{target}' matches no module of the model; it has "
                                  f"{', '.join(sorted(linear))}")
    # the new head trains in full, so never a LoRA target too; peft keeps SEQ_CLS heads out of all-linear itself
    # (and warns when told again), not the others
    heads = [n for n in HEAD_NAMES if n in modules] if PEFT_TASKS[recipe.task] in ("TOKEN_CLS", "QUESTION_ANS") else []
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, task_type=PEFT_TASKS[recipe.task],
                      target_modules=lora.target_modules, modules_to_save=lora.modules_to_save or None,
                      exclude_modules=heads or None)


def with_adapters(model, peft_config, recipe: Recipe, checkpointing: bool):
    """A head task's model with LoRA adapters (peft; its task type trains the new head in full, modules_to_save),
    prepared as TRL prepares an SFT model: k-bit layers for QLoRA, inputs that carry gradients for checkpointing."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    if recipe.lora.quantize != "none":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
    elif checkpointing:  # the frozen embeddings give no gradient to checkpointed layers otherwise
        model.enable_input_require_grads()
    return get_peft_model(model, peft_config)


def parameter_count(model, trainable_only: bool = False) -> int:
    """All (or the trainable) parameters; under ZeRO-3 each rank holds a slice, ds_numel is the whole tensor's size."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad or not trainable_only)


def stop_at_end_of_turn(generation, tokenizer) -> None:
    """Make a generation config stop where the chat template ends the assistant's turn (the first special token after
    its content; the model's own EOS may be another) and pad with the tokenizer's pad token, as serving needs."""
    end = tokenizer.eos_token_id
    if tokenizer.chat_template:
        messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "MARKER"}]
        ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
        ids = ids["input_ids"] if isinstance(ids, dict) else ids
        marker = tokenizer.encode("MARKER", add_special_tokens=False)
        for i in range(len(ids) - len(marker), -1, -1):
            if ids[i : i + len(marker)] == marker:
                end = next((t for t in ids[i + len(marker) :] if t in tokenizer.all_special_ids), None)
                break
    eos = generation.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    if end is not None and end not in eos:
        generation.eos_token_id = eos + [end]
    if generation.pad_token_id is None:
        generation.pad_token_id = tokenizer.pad_token_id
