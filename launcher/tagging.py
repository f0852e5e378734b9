"""Token classification (named entities and other word tags): words aligned to sub-word tokens, and the entity-level
precision, recall and F1 of conlleval (what seqeval computes by default), plus token accuracy. Shared by training,
`launcher evaluate` and sweep reports.

A word's tag goes on its first sub-token; its other sub-tokens and the special tokens carry -100, which the loss
and the metrics skip, so each word counts once however it splits.
"""

from __future__ import annotations

import numpy as np

from launcher.data import label_id

IGNORED = -100


def align(tokenizer, rows: dict, labels: list[str], max_length: int) -> dict:
    """A batch of tokens + tags rows as input ids and one label per sub-token (datasets' batched map)."""
    encoded = tokenizer(rows["tokens"], is_split_into_words=True, truncation=True, max_length=max_length)
    encoded["labels"] = []
    for i, tags in enumerate(rows["tags"]):
        previous, aligned = None, []
        for word in encoded.word_ids(i):
            aligned.append(IGNORED if word is None or word == previous else label_id(tags[word], labels))
            previous = word
        encoded["labels"].append(aligned)
    return encoded


def entities(tags: list[str]) -> set[tuple[str, int, int]]:
    """(type, first word, last word + 1) of each entity in a BIO sequence, chunked as conlleval does: an entity
    starts at B-X, or at I-X after O or another type; a tag without a prefix (IO tagging) counts as I-."""
    found, start, kind = set(), None, None
    for i, tag in enumerate([*tags, "O"]):
        prefix, _, name = tag.partition("-") if tag[:2] in ("B-", "I-") else ("I", "-", tag)
        name = None if tag == "O" else name
        if start is not None and (name != kind or prefix == "B"):
            found.add((kind, start, i))
            start = None
        if name is not None and start is None:
            start, kind = i, name
    return found


def scores(predicted: list[list[str]], gold: list[list[str]]) -> dict[str, float]:
    """Micro-averaged entity precision, recall and F1 over all rows (an entity counts when type and words match
    exactly), and the share of words whose tag is right."""
    right = guessed = true = 0
    for p, g in zip(predicted, gold, strict=True):
        ours, theirs = entities(p), entities(g)
        right, guessed, true = right + len(ours & theirs), guessed + len(ours), true + len(theirs)
    precision, recall = right / max(guessed, 1), right / max(true, 1)
    words = sum(len(g) for g in gold)
    accuracy = sum(a == b for p, g in zip(predicted, gold, strict=True) for a, b in zip(p, g, strict=True))
    return {"precision": precision, "recall": recall,
            "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
            "accuracy": accuracy / max(words, 1)}


def metrics(labels: list[str]):
    """The Trainer's compute_metrics: logits (rows, tokens, tags), padded with -100 where rows are shorter."""

    def compute(eval_pred) -> dict[str, float]:
        predicted, gold = decode(np.asarray(eval_pred[0]).argmax(-1), np.asarray(eval_pred[1]), labels)
        return scores(predicted, gold)

    return compute


def decode(predicted: np.ndarray, label_ids: np.ndarray, labels: list[str]) -> tuple[list, list]:
    """Predicted and gold tag names at the labelled positions (each word's first sub-token) of every row."""
    out, gold = [], []
    for p, g in zip(predicted, label_ids, strict=True):
        keep = g != IGNORED
        out.append([labels[i] for i in p[keep]])
        gold.append([labels[i] for i in g[keep]])
    return out, gold


def make_trainer(recipe, model, args, tokenizer, train_set, eval_set, callbacks, max_length: int):
    from transformers import DataCollatorForTokenClassification

    from launcher import classify

    labels = recipe.head.labels

    def encode(ds):
        return ds.map(lambda rows: align(tokenizer, rows, labels, max_length), batched=True,
                      remove_columns=ds.column_names, desc="tokenizing")

    return classify.build_trainer(model, args, tokenizer, train_set, eval_set, callbacks, encode,
                                  DataCollatorForTokenClassification(tokenizer), metrics(labels),
                                  classify.head_loss("token_classification", None))
