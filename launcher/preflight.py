"""Pre-flight: what the ranks will load first (data rows, tokenizer), checked in the launching process, so bad data
is reported before any rank is started or any job waits in a queue.

The data is loaded exactly as the worker loads it (datasets caches the arrow files, so the ranks' load is then
cheap). Hub datasets are left to the ranks: there may be no network here. A hub tokenizer is checked when it is in
the local cache, and otherwise left to the ranks too.
"""

from __future__ import annotations

import re
from pathlib import Path

from launcher.errors import RecipeError
from launcher.schema import Recipe

# TRL's test for a template that can mask the assistant's tokens (trl.chat_template_utils.has_generation_markers).
GENERATION_MARKERS = re.compile(r"\{%-?\s*generation\s*-?%\}")


def check(recipe: Recipe, where: str) -> None:
    """Raise RecipeError (one line naming the file and row or key) for data or tokenizer problems."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # libraries' notes on stderr would bury the one line that matters
        sets = _data(recipe, where)
        tokenizer = _tokenizer(recipe, where)
        if tokenizer is not None:
            check_template(recipe, where, tokenizer, sets)


def check_template(recipe: Recipe, where: str, tokenizer, sets: list) -> None:
    """The chat template renders the data's first row and, under assistant_only_loss, marks the assistant's tokens.
    sets: (key, path, dataset) for each dataset, as data.load lists them."""
    known = _chat_template(recipe, tokenizer)
    if known is not None:
        _check_template(recipe, where, tokenizer, *known, sets)


def _data(recipe: Recipe, where: str) -> list[tuple[str, str, object]]:
    """(key, path, dataset) for each local dataset, loaded, checked and mixed as the worker does."""
    from launcher import data, ds_config

    if not any(data.is_local(spec) for spec in [*recipe.data.train, *recipe.data.eval]):
        return []  # all on the hub: nothing to import datasets for
    import datasets

    datasets.disable_progress_bars()  # this process only starts ranks; they show their own progress
    loaded: list = []
    data.load(recipe, where, ds_config.training_value(recipe, "seed"), local_only=True, loaded=loaded)
    return loaded


def _tokenizer(recipe: Recipe, where: str):
    """The tokenizer the ranks will load, or None when it is on the hub and not in the local cache."""
    ref = recipe.model.tokenizer or recipe.model.name_or_path
    key = "model.tokenizer" if recipe.model.tokenizer else "model.name_or_path"
    local = Path(ref).is_dir()
    if not local and not _in_hub_cache(ref):
        return None  # not downloaded yet: the ranks download it
    from transformers.utils import logging

    from launcher import modeling

    logging.set_verbosity_error()
    try:
        return modeling.load_tokenizer(recipe, local_files_only=True, quick=True)
    except Exception as err:  # transformers raises OSError, ValueError, ... naming what is missing
        if not local:
            return None  # partly cached: the ranks download the rest
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise RecipeError(f"{ref}: the tokenizer ({key} in {where}) could not be loaded: {reason}; check its files "
                          f"(tokenizer.json, tokenizer_config.json), or point {key} at another tokenizer") from None


def _in_hub_cache(repo: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo, "tokenizer_config.json"), str)
    except Exception:  # not a valid repo id either: the ranks will say so
        return False


def _chat_template(recipe: Recipe, tokenizer) -> tuple[str | None, str] | None:
    """(the chat template TRL will use or None, where it comes from), or None when it cannot be known here."""
    ref = recipe.model.tokenizer or recipe.model.name_or_path
    override = recipe.training.get("chat_template_path")
    if not override:
        template = tokenizer.chat_template
        if isinstance(template, dict):  # named variants: TRL uses the default one
            template = template.get("default")
        return template or None, f"the tokenizer at {ref}"
    path = Path(override)
    if path.is_file() and path.suffix in (".jinja", ".j2"):  # as SFTTrainer reads training.chat_template_path
        return path.read_text(encoding="utf-8"), str(path)
    return None  # a tokenizer to clone the template from, maybe on the hub: TRL checks it


def _check_template(recipe: Recipe, where: str, tokenizer, template: str | None, source: str, sets: list) -> None:
    from launcher import data

    chats = [(key, path, ds) for key, path, ds in sets if data.is_conversational(ds)]
    if chats and not template:
        key, path, _ = chats[0]
        raise RecipeError(f"{source}: no chat template, but {path} ({key}) holds chat messages, which are rendered "
                          "with one; set training.chat_template_path to a .jinja template, or model.tokenizer to a "
                          "tokenizer that has a chat template")
    if recipe.training.get("assistant_only_loss"):
        for key, path, ds in sets:
            if not data.is_conversational(ds):
                raise RecipeError(f"{where}: training.assistant_only_loss is true, but {path} ({key}) is not chat "
                                  "messages; TRL masks assistant turns only in conversations: set "
                                  "training.assistant_only_loss: false")
        if chats:
            template = _training_template(tokenizer, template, source)
    for key, path, ds in chats:
        _render_first_row(recipe, tokenizer, template, ds, key, path)


def _training_template(tokenizer, template: str, source: str) -> str:
    """The template TRL trains with under assistant_only_loss: this one if it has {% generation %} markers, else
    TRL's patched version of a template it knows (importing TRL costs seconds: only on this path)."""
    if GENERATION_MARKERS.search(template):
        return template
    from trl.chat_template_utils import get_training_chat_template

    tokenizer.chat_template = template
    try:
        patched = get_training_chat_template(tokenizer)
    except ValueError:
        raise RecipeError(f"{source}: the chat template has no {{% generation %}} markers, which "
                          "training.assistant_only_loss needs to find the assistant's tokens, and TRL knows no "
                          "patched version of it; wrap the assistant content (and end-of-turn token) in "
                          "{% generation %}...{% endgeneration %} in a copy of the template and set "
                          "training.chat_template_path to it, or set training.assistant_only_loss: false") from None
    return patched or template


def _render_first_row(recipe: Recipe, tokenizer, template: str, ds, key: str, path: str) -> None:
    """Render one conversation as TRL will: a template that cannot render this data fails here, not on N ranks."""
    row = ds[0]
    messages = row["messages"] if "messages" in row else [*row["prompt"], *row["completion"]]
    masks = bool(recipe.training.get("assistant_only_loss"))
    try:
        out = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=masks)
    except Exception as err:  # jinja2's TemplateError, or raise_exception() in the template itself
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise RecipeError(f"{path}: row 1 ({key}): the chat template cannot render it: {reason}; fix the row or "
                          "the template (training.chat_template_path)") from None
    if masks and 1 not in out["assistant_masks"]:
        raise RecipeError(f"{path}: row 1 ({key}): 0% of tokens carry loss: the chat template marks none of its "
                          "tokens as the assistant's, so training.assistant_only_loss would learn nothing; put "
                          "{% generation %}...{% endgeneration %} around the assistant content in the template")
