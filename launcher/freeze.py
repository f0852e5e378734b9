"""Which parameters the recipe's `freeze` section keeps frozen. The task's head always trains.

Decided on parameter names alone, so `plan` can answer from a meta-device model and the worker applies the very
same choice to the real one (before DeepSpeed builds its optimizer: frozen parameters get no optimizer states).
"""

from __future__ import annotations

import fnmatch
import re

from launcher.errors import RecipeError
from launcher.modeling import HEAD_NAMES, parameter_count
from launcher.schema import FreezeSection

# `model.layers.3.`, `bert.encoder.layer.3.`, `transformer.h.3.`, `blocks.3.`: the index of a transformer layer.
LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\.")
EMBEDDINGS = re.compile(r"(?:^|\.)(?:embeddings|embed_tokens|embed_positions|wte|wpe)(?:\.|$)")
HEADS = (*(f"{name}." for name in HEAD_NAMES), "lm_head.")  # the task heads (encoders, decoders), the LM head


def frozen_names(names: list[str], freeze: FreezeSection | None, where: str) -> set[str]:
    """The names, of `names` (a model's parameters), that stay frozen. Raises RecipeError for a rule that would
    freeze nothing: a pattern that matches no parameter, more layers kept than the model has, no embeddings."""
    if freeze is None:
        return set()
    body = [n for n in names if not (n.startswith(HEADS) or any(f".{h}" in n for h in HEADS))]
    layer_of = {n: int(m.group(1)) for n in body if (m := LAYER.search(n))}
    count = max(layer_of.values()) + 1 if layer_of else 0
    out: set[str] = set()
    if freeze.embeddings or freeze.all_but_last is not None:
        embeddings = {n for n in body if EMBEDDINGS.search(n)}
        if not embeddings:
            raise RecipeError(f"{where}: freeze: this model has no parameters named like embeddings "
                              f"(e.g. {body[0]}); freeze them by freeze.patterns instead")
        out |= embeddings
    if freeze.all_but_last is not None:
        if freeze.all_but_last >= count:
            raise RecipeError(f"{where}: freeze.all_but_last is {freeze.all_but_last}, but the model has {count} "
                              f"layers: nothing would be frozen beyond the embeddings; use a number below {count}")
        out |= {n for n, i in layer_of.items() if i < count - freeze.all_but_last}
    for pattern in freeze.patterns:
        matched = {n for n in body if fnmatch.fnmatchcase(n, pattern)}
        if not matched:
            raise RecipeError(f"{where}: freeze.patterns '{pattern}' matches no parameter of the model (the head "
                              f"always trains); names look like {body[0]}")
        out |= matched
    return out


def apply(model, freeze: FreezeSection | None, where: str) -> tuple[int, int]:
    """Freeze the model's parameters as the recipe says; returns (trainable, total) parameter counts."""
    named = dict(model.named_parameters())
    for name in frozen_names(list(named), freeze, where):
        named[name].requires_grad_(False)
    return parameter_count(model, trainable_only=True), parameter_count(model)


def describe(trainable: int, total: int) -> str:
    return f"{trainable / 1e6:,.2f} M of {total / 1e6:,.2f} M parameters trainable ({100 * trainable / total:.1f}%)"
