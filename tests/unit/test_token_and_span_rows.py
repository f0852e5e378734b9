"""Rows of the NER and extractive-QA tasks: every bad-row class refused by row number before anything trains,
spans turned into BIO words, and the entity and SQuAD scores checked against cases worked by hand."""

from __future__ import annotations

import json

import pytest

from launcher import extractive, tagging
from launcher.data import load_one
from launcher.errors import RecipeError
from launcher.schema import DatasetSpec

TAGS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
GOOD_TAGS = {"tokens": ["Ada", "Lovelace", "visited", "Paris"], "tags": ["B-PER", "I-PER", "O", "B-LOC"]}
GOOD_SPANS = {"text": "Ada Lovelace visited Paris.", "spans": [{"start": 0, "end": 12, "label": "PER"}]}
GOOD_QA = {"question": "Where?", "context": "She lives in Paris.", "answers": {"text": ["Paris"], "answer_start": [13]}}


def load(tmp_path, rows, task):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return load_one(DatasetSpec(path=str(path)), "recipe.yaml", "data.train.0", task, TAGS)


BAD = {
    "tags and tokens of different lengths": ("token_classification", {**GOOD_TAGS, "tags": ["B-PER", "I-PER", "O"]},
                                             "has 4 tokens but 3 tags"),
    "an unknown tag": ("token_classification", {**GOOD_TAGS, "tags": ["B-PER", "I-PER", "O", "B-ORG"]},
                       "tag 4 ('Paris') is 'B-ORG'"),
    "a span outside the text": ("token_classification", {**GOOD_SPANS, "spans": [{"start": 21, "end": 40,
                                                                                  "label": "LOC"}]},
                                "span 1 (21..40) lies outside the text"),
    "a span that cuts a word": ("token_classification", {**GOOD_SPANS, "spans": [{"start": 0, "end": 2,
                                                                                  "label": "PER"}]},
                                "cuts a word"),
    "overlapping spans": ("token_classification", {**GOOD_SPANS, "spans": [
        {"start": 0, "end": 12, "label": "PER"}, {"start": 4, "end": 12, "label": "PER"}]}, "overlaps"),
    "a span label without its tags": ("token_classification", {**GOOD_SPANS, "spans": [
        {"start": 0, "end": 12, "label": "ORG"}]}, "B-ORG and I-ORG"),
    "an answer not at its start": ("question_answering", {**GOOD_QA, "answers": {"text": ["Paris"],
                                                                                 "answer_start": [3]}},
                                   "answer 1 'Paris' is not at character 3 of the context"),
    "an answer not in the context": ("question_answering", {**GOOD_QA, "answers": {"text": ["Rome"],
                                                                                   "answer_start": [13]}},
                                     "the context does not contain it"),
    "no answer": ("question_answering", {**GOOD_QA, "answers": {"text": [], "answer_start": []}}, "has no answer"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_row_is_refused_by_number(tmp_path, case):
    task, bad, needle = BAD[case]
    good = GOOD_QA if task == "question_answering" else GOOD_TAGS if "tags" in bad else GOOD_SPANS
    with pytest.raises(RecipeError) as err:
        load(tmp_path, [good, good, bad], task)
    assert "rows.jsonl: row 3: " in str(err.value) and needle in str(err.value), str(err.value)


def test_spans_become_words_with_bio_tags(tmp_path):
    row = {"text": "Ada Lovelace visited New York.", "spans": [{"start": 21, "end": 29, "label": "LOC"},
                                                              {"start": 0, "end": 12, "label": "PER"}]}
    (out,) = load(tmp_path, [row], "token_classification")
    assert out == {"tokens": ["Ada", "Lovelace", "visited", "New", "York", "."],
                   "tags": ["B-PER", "I-PER", "O", "B-LOC", "I-LOC", "O"]}


def test_entity_scores_worked_by_hand():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-LOC", "I-LOC", "O", "O"]]
    # row 1: PER right, LOC missed; row 2: LOC cut short (wrong), an extra PER guessed from a lone I- tag
    predicted = [["B-PER", "I-PER", "O", "O"], ["B-LOC", "O", "O", "I-PER"]]
    got = tagging.scores(predicted, gold)
    assert got["precision"] == pytest.approx(1 / 3) and got["recall"] == pytest.approx(1 / 3)
    assert got["f1"] == pytest.approx(1 / 3) and got["accuracy"] == pytest.approx(5 / 8)
    assert tagging.entities(["I-LOC", "I-LOC", "B-LOC", "I-PER"]) == {("LOC", 0, 2), ("LOC", 2, 3), ("PER", 3, 4)}


def test_squad_scores_take_the_best_reference():
    got = extractive.scores(["The Eiffel Tower!", "in Paris"], [["Eiffel tower", "the tower"], ["Paris, France"]])
    assert got["exact_match"] == pytest.approx(0.5)
    assert got["f1"] == pytest.approx((1 + 2 * 0.5 * 0.5 / 1.0) / 2)  # "in paris" vs "paris france": P = R = 1/2


def test_long_contexts_are_read_in_windows_that_find_the_answer():
    from transformers import AutoTokenizer

    from tests.helpers import BASE

    tokenizer = AutoTokenizer.from_pretrained(BASE)
    context = " ".join(["The movie was dull."] * 12 + ["The ending was superb."] + ["The cast was bland."] * 6)
    start = context.index("superb")
    rows = {"question": ["What was the ending?"], "context": [context],
            "answers": [{"text": ["superb"], "answer_start": [start]}]}
    encoded, origin, offsets = extractive.features(tokenizer, rows, max_length=32, stride=8)
    assert len(origin) > 3 and set(origin) == {0}
    spans = zip(encoded["start_positions"], encoded["end_positions"], strict=True)
    found = [i for i, (s, e) in enumerate(spans) if (s, e) != (0, 0)]
    assert found, "no window holds the answer"
    for i in found:
        s, e = encoded["start_positions"][i], encoded["end_positions"][i]
        assert context[offsets[i][s][0] : offsets[i][e][1]] == "superb"
    # the best span search reads the answer back from logits that point at it in one window
    import numpy as np

    width = max(len(o) for o in offsets)
    starts, ends = np.full((len(origin), width), -5.0), np.full((len(origin), width), -5.0)
    i = found[0]
    starts[i, encoded["start_positions"][i]] = ends[i, encoded["end_positions"][i]] = 5.0
    assert extractive.best_answers(starts, ends, origin, offsets, [context]) == ["superb"]


def test_a_question_is_refused_exactly_when_the_tokenizer_cannot_window_it():
    """check_questions' bound is the tokenizer's own: each question length either windows or is refused."""
    from transformers import AutoTokenizer

    from tests.helpers import REPO

    tokenizer = AutoTokenizer.from_pretrained(REPO / "recipes" / "qa" / "model")
    context, seen = " ".join(["born"] * 80), set()
    for words in range(20, 50):
        question = " ".join(["what"] * words)
        try:
            tokenizer([question], [context], truncation="only_second", max_length=48, stride=12,
                      return_overflowing_tokens=True)
            windows = True
        except BaseException:  # noqa: BLE001 - the tokenizer's Rust panic is no Exception
            windows = False
        try:
            extractive.check_questions(tokenizer, [question], 48, 12, "rows.jsonl")
            refused = False
        except RecipeError as err:
            assert str(err).startswith("rows.jsonl: row 1: the question is"), str(err)
            refused = True
        assert windows != refused, (words, windows)
        seen.add(refused)
    assert seen == {True, False}, "the lengths tried must reach both sides of the bound"
