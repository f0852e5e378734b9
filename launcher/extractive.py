"""Extractive question answering: SQuAD-style rows read in windows, answers mapped to start and end tokens, and the
best span per question scored with SQuAD's exact match and F1. Shared by training and `launcher evaluate`.

A context longer than the window is read in several windows that overlap by `stride` tokens, each holding the whole
question. A window that holds the whole (first) answer learns its start and end tokens; the others learn to point at
the first token ([CLS]): no answer here. A question's answer is the best-scoring span (start logit + end logit, at
most MAX_ANSWER tokens, inside the context) over all its windows.
"""

from __future__ import annotations

import re
import string

import numpy as np

from launcher import answers
from launcher.errors import RecipeError

MAX_ANSWER = 30  # tokens; SQuAD's evaluation scripts use 30
CONFIG_KEY = "qa_windows"  # in the model's config.json: the windows it was trained with, for `launcher evaluate`


def windows(recipe) -> dict[str, int]:
    from launcher import ds_config

    return window_sizes(ds_config.training_value(recipe, "max_length"), recipe.head.stride)


def window_sizes(max_length: int, stride: int | None) -> dict[str, int]:
    return {"max_length": max_length, "stride": stride or max_length // 4}


def check_questions(tokenizer, questions, max_length: int, stride: int, where: str) -> None:
    """Refuse (by row number) a question that leaves its windows no room to move on: a window holds the whole
    question, and the next one starts `stride` tokens before the end of this one's context, so the context's part
    must be longer than `stride`. (The tokenizer would panic in every rank, after the queue.)"""
    room = max_length - tokenizer.num_special_tokens_to_add(pair=True)
    for number, ids in enumerate(tokenizer(list(questions), add_special_tokens=False)["input_ids"], 1):
        if len(ids) >= room - stride:
            raise RecipeError(f"{where}: row {number}: the question is {len(ids)} tokens, which leaves "
                              f"{max(room - len(ids), 0)} of the {max_length}-token window (training.max_length) "
                              f"for the context, and windows overlap by head.stride ({stride}), so that part must "
                              "be longer than the stride; shorten the question, raise training.max_length or lower "
                              "head.stride")


def features(tokenizer, rows, max_length: int, stride: int, where: str = "the data"
             ) -> tuple[dict, list[int], list[list]]:
    """Every window of every row: model inputs with start and end positions, the row each window comes from, and
    each token's character span in the context (None outside it)."""
    check_questions(tokenizer, rows["question"], max_length, stride, where)
    encoded = tokenizer(list(rows["question"]), list(rows["context"]), truncation="only_second", max_length=max_length,
                        stride=stride, return_overflowing_tokens=True, return_offsets_mapping=True)
    origin, answers_of = list(encoded.pop("overflow_to_sample_mapping")), list(rows["answers"])
    offsets, starts, ends = [], [], []
    for i, row in enumerate(origin):
        in_context = [s == 1 for s in encoded.sequence_ids(i)]
        spans = [tuple(o) if inside else None for o, inside in zip(encoded["offset_mapping"][i], in_context,
                                                                    strict=True)]
        answer = answers_of[row]
        begin = answer["answer_start"][0]
        start, end = _tokens_of(spans, begin, begin + len(answer["text"][0]))
        offsets.append(spans)
        starts.append(start)
        ends.append(end)
    encoded.pop("offset_mapping")
    return {**encoded, "start_positions": starts, "end_positions": ends}, origin, offsets


def _tokens_of(spans: list, begin: int, end: int) -> tuple[int, int]:
    """The first and last token of characters begin..end, or (0, 0) when the window does not hold them all."""
    inside = [i for i, s in enumerate(spans) if s is not None]
    if not inside or spans[inside[0]][0] > begin or spans[inside[-1]][1] < end:
        return 0, 0
    first = next(i for i in inside if spans[i][1] > begin)
    last = next(i for i in reversed(inside) if spans[i][0] < end)
    return first, last


def best_answers(start_logits: np.ndarray, end_logits: np.ndarray, origin: list[int], offsets: list[list],
                 contexts: list[str]) -> list[str]:
    """The best span's text for each row, over all its windows."""
    best: dict[int, tuple[float, str]] = {}
    for i, row in enumerate(origin):
        inside = np.array([s is not None for s in offsets[i]] + [False] * (len(start_logits[i]) - len(offsets[i])))
        width = len(offsets[i])
        score = start_logits[i][:width, None] + end_logits[i][None, :width]  # [start, end]
        allowed = np.triu(np.ones((width, width), bool)) & ~np.triu(np.ones((width, width), bool), MAX_ANSWER)
        allowed &= inside[:width, None] & inside[None, :width]
        if not allowed.any():
            continue
        flat = int(np.where(allowed, score, -np.inf).argmax())
        start, end = divmod(flat, width)
        value = float(score[start, end])
        if row not in best or value > best[row][0]:
            best[row] = (value, contexts[row][offsets[i][start][0] : offsets[i][end][1]])
    return [best.get(row, (0.0, ""))[1] for row in range(len(contexts))]


def normalize(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(c for c in text.lower() if c not in string.punctuation)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def scores(predicted: list[str], references: list[list[str]]) -> dict[str, float]:
    """SQuAD's exact match and F1: each question's best over its reference answers, averaged over questions."""
    exact = [max(normalize(p) == normalize(r) for r in refs) for p, refs in zip(predicted, references, strict=True)]
    f1 = [max(answers.f1(p, r, normalize) for r in refs) for p, refs in zip(predicted, references, strict=True)]
    return {"exact_match": float(np.mean(exact)), "f1": float(np.mean(f1))}


def metrics(eval_rows, origin: list[int], offsets: list[list]):
    """The Trainer's compute_metrics over the eval windows, in their order (the Trainer keeps it across ranks)."""
    contexts, references = eval_rows["context"], [a["text"] for a in eval_rows["answers"]]

    def compute(eval_pred) -> dict[str, float]:
        start_logits, end_logits = (np.asarray(x) for x in eval_pred[0][:2])
        return scores(best_answers(start_logits, end_logits, origin, offsets, contexts), references)

    return compute


def make_trainer(recipe, model, args, tokenizer, train_set, eval_set, callbacks, max_length: int):
    """No compute_loss_func: the model's own loss (the mean of the start and end cross-entropies) is a per-rank
    mean, which the Trainer divides by the accumulation steps and DeepSpeed averages over ranks."""
    import datasets
    from transformers import DataCollatorWithPadding

    from launcher import classify

    size = windows(recipe)
    setattr(model.config, CONFIG_KEY, size)  # saved with every checkpoint: evaluate reads the same windows
    kept: dict = {}

    def encode(ds):
        name = "data.eval" if ds is eval_set else "data.train"
        encoded, origin, offsets = features(tokenizer, ds, size["max_length"], size["stride"], name)
        if ds is eval_set:
            kept.update(origin=origin, offsets=offsets)
        return datasets.Dataset.from_dict(encoded)

    trainer = classify.build_trainer(model, args, tokenizer, train_set, eval_set, callbacks, encode,
                                     DataCollatorWithPadding(tokenizer), None, None)
    if eval_set is not None:
        trainer.compute_metrics = metrics(eval_set, kept["origin"], kept["offsets"])
    return trainer
