"""Packing: several sequences in one row, told apart by position_ids that restart at each sequence (TRL's "bfd"
strategy, padding-free). It is only right if the model's attention keeps each sequence to itself.

Two checks: before launch, from the transformers sources of the recipe's architecture (`mixing_cause`: no heavy
import, for `plan`); and in the dry run, numerically on the built model (`compare`): each sequence's loss in a
packed row must equal its loss computed alone.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

# Each sequence's loss, packed against alone, in float32: what differs is the order of the attention's sums (about
# 1e-6 here). A model that lets a sequence see the one before it differs by far more (about 1e-2 on a random tiny
# Llama, from the first token of the second sequence on).
TOLERANCE = 1e-4

# Layers that carry a state from token to token (state-space, linear attention, short convolutions): they ignore
# position_ids, so a packed sequence starts from the state the previous one left. Read from the modeling files of
# transformers 5.24: every architecture with such layers names one of these.
RECURRENT = re.compile(r"conv_states|recurrent_states|ssm_state|linear_attn|LinearAttention|ShortConv|causal_conv1d|"
                       r"selective_scan|state_space", re.IGNORECASE)
# masking_utils' builders find packed sequences from position_ids when there is no attention mask (padding-free
# batches have none) and make the mask block-diagonal; flash-attention reads the same position_ids.
MASKS = re.compile(r"create_causal_mask|create_sliding_window_causal_mask|create_chunked_causal_mask|"
                   r"create_masks_for_generate")


def on(training: dict) -> bool:
    """Whether rows hold several sequences told apart by position_ids: packing (bfd strategies) or padding-free."""
    strategy = training.get("packing_strategy", "bfd")
    return bool(training.get("padding_free")) or (bool(training.get("packing")) and strategy != "wrapped")


def mixing_cause(model_type: str | None) -> str | None:
    """Why this architecture would mix packed sequences, read from its transformers modeling file; None when it
    keeps them apart, or when it cannot be told (remote code: the dry run's numeric check decides)."""
    source = _modeling_source(model_type)
    if source is None:
        return None
    if found := RECURRENT.search(source):
        return (f"its layers carry a state from token to token ({found.group(0)} in modeling_{model_type}.py), "
                "which position_ids do not reset")
    if not MASKS.search(source):
        return (f"modeling_{model_type}.py builds its attention mask without the packed-sequence detection of "
                "transformers' masking_utils, so it ignores where position_ids restart")
    return None


def _modeling_source(model_type: str | None) -> str | None:
    if not model_type or not re.fullmatch(r"[a-z0-9_]+", model_type):
        return None
    spec = importlib.util.find_spec("transformers")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / model_type / f"modeling_{model_type}.py"
    return path.read_text(encoding="utf-8") if path.is_file() else None


def compare(model, sequences: list[list[int]], pad_id: int) -> list[tuple[float, float]]:
    """(loss packed, loss alone) for each sequence: packed into one row as TRL's padding-free collator builds it,
    and each run by itself. The model's parameters must be whole (under ZeRO-3: inside `gathered`)."""
    import torch
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    collate = DataCollatorForLanguageModeling(pad_token_id=pad_id, padding_free=True)
    packed = collate([{"input_ids": s} for s in sequences])
    training = model.training
    model.eval()  # no dropout: the two forwards must see the same weights
    try:
        with torch.no_grad():
            inputs = {k: v for k, v in packed.items() if k != "labels"}  # as the trainer passes the batch
            # no cache, as in training (TRL's loss forward sets it off): with one, masking_utils skips the packed check
            row = _token_losses(model(**inputs, use_cache=False).logits[0], packed["input_ids"][0])
            losses, start = [], 0
            for s in sequences:
                alone = _token_losses(model(input_ids=torch.tensor([s]), use_cache=False).logits[0], torch.tensor(s))
                # the packed row's last position of each sequence predicts the next sequence's first token: skip it
                losses.append((row[start:start + len(s) - 1].mean().item(), alone.mean().item()))
                start += len(s)
    finally:
        model.train(training)
    return losses


def _token_losses(logits, ids):
    import torch

    return torch.nn.functional.cross_entropy(logits[:-1].float(), ids[1:], reduction="none")


def worst(losses: list[tuple[float, float]]) -> tuple[int, float]:
    """(index, relative difference) of the sequence whose packed loss is furthest from its loss alone."""
    gaps = [abs(p - a) / max(abs(a), 1e-12) for p, a in losses]
    index = max(range(len(gaps)), key=gaps.__getitem__)
    return index, gaps[index]


def gathered(model):
    """A context in which every parameter is whole: ZeRO-3 partitions them as the model is built."""
    import contextlib

    params = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
