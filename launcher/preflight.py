"""Pre-flight: what the ranks will load first (data rows, tokenizer), checked in the launching process, so bad data
is reported before any rank is started or any job waits in a queue.

The data is loaded exactly as the worker loads it (datasets caches the arrow files, so the ranks' load is then
cheap). Hub datasets are left to the ranks: there may be no network here. A hub tokenizer is checked when it is in
the local cache, and otherwise left to the ranks too.

The packages the recipe needs (flash-attn, bitsandbytes) are looked up here too, without importing them: the ranks
run this same Python (`launch` starts them with sys.executable, and the Slurm job script runs the sys.executable of
`submit`), so what is installed here is what they import, even on a login node without a GPU. `plan` does not look.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import sys
import warnings
from pathlib import Path

from launcher import data, ds_config, extractive, modeling, weights
from launcher.errors import RecipeError
from launcher.schema import Recipe

# TRL's test for a template that can mask the assistant's tokens (trl.chat_template_utils.has_generation_markers).
GENERATION_MARKERS = re.compile(r"\{%-?\s*generation\s*-?%\}")


# attn_implementation: (module, distribution, lowest version), as transformers' FLASH_ATTENTION_COMPATIBILITY_MATRIX
# (modeling_flash_attention_utils.py) tells them apart: FA2 and FA4 share the module flash_attn.
FLASH = {"flash_attention_2": ("flash_attn", "flash-attn", "2.3.3"),
         "flash_attention_3": ("flash_attn_interface", "flash-attn-3", None),
         "flash_attention_4": ("flash_attn", "flash-attn-4", None)}
# With flash-attn missing and `kernels` in this range installed, transformers loads the hub kernel instead
# (modeling_utils._check_and_adjust_attn_implementation; FLASH_ATTN_KERNEL_FALLBACK, KERNELS_MIN/MAX_VERSION).
KERNELS = {"flash_attention_2": "kernels-community/flash-attn2",
           "flash_attention_3": "kernels-community/vllm-flash-attn3",
           "flash_attention_4": "kernels-community/flash-attn4"}
KERNELS_VERSIONS = ("0.18.2", "0.19.0")
BITSANDBYTES_VERSION = "0.46.1"  # transformers' BITSANDBYTES_MIN_VERSION
LIGER_VERSION = "0.3.0"  # transformers' is_liger_kernel_available


def check(recipe: Recipe, where: str) -> None:
    """Raise RecipeError (one line naming the file and row or key) for data, tokenizer or package problems."""
    check_packages(recipe, where)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # libraries' notes on stderr would bury the one line that matters
        sets: list = []  # (key, path, dataset) for each local dataset
        if any(data.is_local(spec) for spec in [*recipe.data.train, *recipe.data.eval]):  # else no datasets import
            import datasets

            datasets.disable_progress_bars()  # this process only starts ranks; they show their own progress
            data.load(recipe, where, ds_config.training_value(recipe, "seed"), local_only=True, loaded=sets)
        if (tokenizer := _tokenizer(recipe, where)) is not None:
            check_template(recipe, where, tokenizer, sets)
            if recipe.task == "question_answering":
                size = extractive.windows(recipe)
                for _, path, ds in sets:
                    extractive.check_questions(tokenizer, ds["question"], size["max_length"], size["stride"], path)


def check_packages(recipe: Recipe, where: str) -> None:
    """The packages the recipe's attention and QLoRA need, installed in this Python (so for the ranks)."""
    python, impl, lora = sys.executable, recipe.model.attn_implementation, recipe.lora
    if impl in FLASH and not _at_least(*FLASH[impl]) and not _hub_kernel(impl, where, python):
        dist, lowest = FLASH[impl][1:]
        version = f" {lowest} or newer" if lowest else ""
        raise RecipeError(f"{where}: model.attn_implementation {impl} needs {dist}{version}, which {python} (the "
                          f"Python the ranks run) lacks: pip install {dist} --no-build-isolation, or set "
                          "model.attn_implementation: sdpa")
    if lora and lora.quantize != "none" and not _at_least("bitsandbytes", "bitsandbytes", BITSANDBYTES_VERSION):
        raise RecipeError(f"{where}: lora.quantize {lora.quantize} (QLoRA) needs bitsandbytes {BITSANDBYTES_VERSION} "
                          f"or newer, which {python} (the Python the ranks run) lacks: pip install bitsandbytes, or "
                          "set lora.quantize: none")
    if recipe.training.get("use_liger_kernel") and not _at_least("liger_kernel", "liger-kernel", LIGER_VERSION):
        raise RecipeError(f"{where}: training.use_liger_kernel needs liger-kernel {LIGER_VERSION} or newer, which "
                          f"{python} (the Python the ranks run) lacks: pip install liger-kernel, or remove "
                          "use_liger_kernel")


def _hub_kernel(impl: str, where: str, python: str) -> bool:
    """Whether transformers will load the hub kernel for a missing flash-attn: `kernels` is installed (in the
    range it accepts), and every rank fetches the kernel at start, so offline it must be in the cache already."""
    from packaging.version import Version

    kernels = _version("kernels", "kernels")
    if kernels is None or not Version(KERNELS_VERSIONS[0]) <= kernels < Version(KERNELS_VERSIONS[1]):
        return False
    if weights.offline() and not _cached(KERNELS[impl]):
        raise RecipeError(f"{where}: model.attn_implementation {impl} needs {FLASH[impl][1]}, which {python} lacks, "
                          f"and the hub kernel transformers would load instead ({KERNELS[impl]}, as the kernels "
                          "package is installed) is not in the cache, with HF_HUB_OFFLINE set: pip install "
                          f"{FLASH[impl][1]} --no-build-isolation, or set model.attn_implementation: sdpa")
    return True


def _at_least(module: str, dist: str, lowest: str | None) -> bool:
    from packaging.version import Version

    found = _version(module, dist)
    return found is not None and (lowest is None or found >= Version(lowest))


def _version(module: str, dist: str):
    """The installed version of distribution `dist` when it provides an importable `module`, else None; imports
    nothing (find_spec of a top-level name only looks at the path)."""
    from packaging.version import InvalidVersion, Version

    try:
        return Version(importlib.metadata.version(dist)) if importlib.util.find_spec(module) else None
    except (importlib.metadata.PackageNotFoundError, InvalidVersion):
        return None


def _cached(repo: str) -> bool:
    """Whether a hub repo has a snapshot in the cache kernels downloads to (KERNELS_CACHE, else the hub's)."""
    from huggingface_hub.constants import HF_HUB_CACHE

    cache = os.environ.get("KERNELS_CACHE") or os.environ.get("HF_KERNELS_CACHE") or HF_HUB_CACHE
    snapshots = Path(cache) / f"models--{repo.replace('/', '--')}" / "snapshots"
    return snapshots.is_dir() and any(snapshots.iterdir())


def _tokenizer(recipe: Recipe, where: str):
    """The tokenizer the ranks will load, or None when it is on the hub and not in the local cache."""
    ref = recipe.model.tokenizer or recipe.model.name_or_path
    key = "model.tokenizer" if recipe.model.tokenizer else "model.name_or_path"
    if not (local := Path(ref).is_dir()):
        from huggingface_hub import try_to_load_from_cache

        try:
            if not isinstance(try_to_load_from_cache(ref, "tokenizer_config.json"), str):
                return None  # not downloaded yet: the ranks download it
        except Exception:  # not a valid repo id either: the ranks will say so
            return None
    from transformers.utils import logging

    logging.set_verbosity_error()
    try:
        return modeling.load_tokenizer(recipe, local_files_only=True, quick=True)
    except Exception as err:  # transformers raises OSError, ValueError, ... naming what is missing
        if not local:
            return None  # partly cached: the ranks download the rest
        raise RecipeError(f"{ref}: the tokenizer ({key} in {where}) could not be loaded: {data.reason(err)}; check "
                          f"its files (tokenizer.json, tokenizer_config.json), or point {key} at another tokenizer"
                          ) from None


def check_template(recipe: Recipe, where: str, tokenizer, sets: list) -> None:
    """The chat template renders the data's first row and, under assistant_only_loss, marks the assistant's tokens.
    sets: (key, path, dataset) for each dataset, as data.load lists them."""
    override = recipe.training.get("chat_template_path")
    if not override:
        template = tokenizer.chat_template
        if isinstance(template, dict):  # named variants: TRL uses the default one
            template = template.get("default")
        source = f"the tokenizer at {recipe.model.tokenizer or recipe.model.name_or_path}"
    elif Path(override).is_file() and Path(override).suffix in (".jinja", ".j2"):  # as SFTTrainer reads it
        template, source = Path(override).read_text(encoding="utf-8"), str(Path(override))
    else:
        return  # a tokenizer to clone the template from, maybe on the hub: TRL checks it
    chats = [(key, path, ds) for key, path, ds in sets if data.is_conversational(ds)]
    if chats and not template:
        raise RecipeError(f"{source}: no chat template, but {chats[0][1]} ({chats[0][0]}) holds chat messages, which "
                          "are rendered with one; set training.chat_template_path to a .jinja template, or "
                          "model.tokenizer to a tokenizer that has a chat template")
    masks = bool(recipe.training.get("assistant_only_loss"))
    for key, path, ds in sets:
        if masks and not data.is_conversational(ds):
            raise RecipeError(f"{where}: training.assistant_only_loss is true, but {path} ({key}) is not chat "
                              "messages; TRL masks assistant turns only in conversations: set "
                              "training.assistant_only_loss: false")
    if masks and chats and not GENERATION_MARKERS.search(template):
        # without {% generation %} markers, TRL trains with its patched version of a template it knows (importing
        # TRL costs seconds: only on this path)
        from trl.chat_template_utils import get_training_chat_template

        tokenizer.chat_template = template
        try:
            template = get_training_chat_template(tokenizer) or template
        except ValueError:
            raise RecipeError(f"{source}: the chat template has no {{% generation %}} markers, which "
                              "training.assistant_only_loss needs to find the assistant's tokens, and TRL knows no "
                              "patched version of it; wrap the assistant content (and end-of-turn token) in "
                              "{% generation %}...{% endgeneration %} in a copy of the template and set "
                              "training.chat_template_path to it, or set training.assistant_only_loss: false"
                              ) from None
    for key, path, ds in chats:  # rendered as TRL will: a template that cannot render the data fails here, once
        row = ds[0]
        messages = row["messages"] if "messages" in row else [*row["prompt"], *row["completion"]]
        try:
            out = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=True,
                                                return_assistant_tokens_mask=masks)
        except Exception as err:  # jinja2's TemplateError, or raise_exception() in the template itself
            raise RecipeError(f"{path}: row 1 ({key}): the chat template cannot render it: {data.reason(err)}; fix "
                              "the row or the template (training.chat_template_path)") from None
        if masks and 1 not in out["assistant_masks"]:
            raise RecipeError(f"{path}: row 1 ({key}): 0% of tokens carry loss: the chat template marks none of its "
                              "tokens as the assistant's, so training.assistant_only_loss would learn nothing; put "
                              "{% generation %}...{% endgeneration %} around the assistant content in the template")

