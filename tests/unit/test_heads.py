"""Classification and regression heads at plan time: the schema, freezing by name, trainable counts against the real
model, data rows with labels, and the metrics and class weights computed by hand."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from launcher import classify
from tests.helpers import BASE, REPO, SENTIMENT, assert_rejected, cli, sentiment_recipe


def plan_json(recipe: Path, *flags) -> dict:
    result = cli("plan", recipe, "--nproc_per_node", 2, "--format", "json", *flags)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def real_counts(frozen) -> tuple[int, int]:
    """(trainable, total) of the real model with a new 2-label head, frozen by a test of the parameter's name."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(BASE, num_labels=2)
    sizes = [(p.numel(), frozen(name)) for name, p in model.named_parameters()]
    return sum(n for n, f in sizes if not f), sum(n for n, _ in sizes)


def test_plan_counts_what_the_freeze_leaves_trainable(tmp_path):
    plan = plan_json(sentiment_recipe(tmp_path))  # all_but_last: 1 of the 4 layers
    trainable, total = real_counts(lambda n: ".embeddings." in n or any(f".layer.{i}." in n for i in range(3)))
    assert (plan["trainable_params"], plan["params"]) == (trainable, total)
    text = cli("plan", sentiment_recipe(tmp_path)).stdout
    assert "all layers but the last 1" in text and "classification ['negative', 'positive']" in text


def test_plan_counts_a_freeze_by_pattern(tmp_path):
    recipe = sentiment_recipe(tmp_path, freeze={"patterns": ["*.attention.*"], "all_but_last": None})
    trainable, total = real_counts(lambda n: ".attention." in n)
    plan = plan_json(recipe)
    assert (plan["trainable_params"], plan["params"]) == (trainable, total)


def test_the_head_always_trains(tmp_path):
    recipe = sentiment_recipe(tmp_path, freeze={"patterns": ["*"], "all_but_last": None})
    trainable, _ = real_counts(lambda n: not n.startswith("classifier."))
    assert plan_json(recipe)["trainable_params"] == trainable > 0


BAD = {
    "classification without labels": ({"head": {"labels": []}}, ["head.labels", "at least two"]),
    "a label twice": ({"head": {"labels": ["a", "a"]}}, ["head.labels", "twice"]),
    "class weights of the wrong length": ({"head": {"labels": ["negative", "positive"], "class_weights": [1.0]}},
                                          ["head.class_weights", "2 positive numbers"]),
    "an unknown task": ({"task": "translation"}, ["task", "sft, classification, regression"]),
    "an SFT option for a classifier": ({"training": {"packing": True}}, ["training.packing", "SFT option"]),
    "LoRA and freeze on a classifier": ({"lora": {"r": 8}}, ["freeze", "and lora both choose what trains"]),
    "labels for regression": ({"task": "regression"}, ["head.labels", "regression predicts one number"]),
    "class weights for tagging": ({"task": "token_classification", "head": {"class_weights": "balanced"}},
                                  ["head.class_weights", "task is token_classification"]),
    "a stride for a classifier": ({"head": {"stride": 8}}, ["head.stride", "question_answering contexts"]),
    "a pattern that matches nothing": ({"freeze": {"patterns": ["*.adapter.*"]}},
                                       ["freeze.patterns", "*.adapter.*", "matches no parameter"]),
    "more layers kept than the model has": ({"freeze": {"all_but_last": 4}},
                                            ["freeze.all_but_last", "4 layers"]),
    "an unknown freeze key": ({"freeze": {"layers": 2}}, ["freeze.layers", "is not a known key"]),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_classification_recipe(tmp_path, case):
    sections, needles = BAD[case]
    recipe = sentiment_recipe(tmp_path, **sections)
    assert_rejected(cli("plan", recipe), str(recipe), *needles)


def test_freeze_and_lora_together_are_refused(tmp_path):
    from tests.helpers import smoke_recipe

    recipe = smoke_recipe(tmp_path, lora={"r": 8}, freeze={"embeddings": True})
    assert_rejected(cli("plan", recipe), "freeze", "LoRA already freezes")


def test_a_head_section_on_an_sft_recipe_is_refused(tmp_path):
    from tests.helpers import smoke_recipe

    recipe = smoke_recipe(tmp_path, head={"labels": ["a", "b"]})
    assert_rejected(cli("plan", recipe), "head", "task is sft")


@pytest.mark.parametrize("row, needles", [
    ({"text": "fine", "label": "neutral"}, ["row 3", "'neutral'", "head.labels"]),
    ({"text": "fine", "label": 7}, ["row 3", "7", "0 to 1"]),
    ({"text": "", "label": "positive"}, ["row 3", "'text' is empty"]),
    ({"text": "fine"}, ["row 3", "no 'label'"]),
], ids=["unknown label name", "label id out of range", "empty text", "no label"])
def test_bad_labelled_rows_are_refused_before_any_rank_starts(tmp_path, row, needles):
    good = [{"text": "good", "label": "positive"}, {"text": "bad", "label": "negative"}]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [*good, row, good[0]]))
    recipe = sentiment_recipe(tmp_path, data={"train": [{"path": str(data)}]})
    assert_rejected(cli("launch", recipe, "--nproc_per_node", 2), str(data), *needles)
    assert not (tmp_path / "run").exists()


def test_rows_without_text_and_label_columns_are_refused(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"sentence": "good", "sentiment": "positive"}) + "\n")
    recipe = sentiment_recipe(tmp_path, data={"train": [{"path": str(data)}]})
    assert_rejected(cli("launch", recipe, "--nproc_per_node", 2), str(data), "'text' and 'label'", "columns")


def test_metrics_by_hand():
    # predicted 0 0 1 1 against 0 1 1 1: class 0 precision 1/2 recall 1/1, class 1 precision 2/2 recall 2/3
    logits = np.array([[2.0, 1.0], [3.0, 0.0], [0.0, 1.0], [-1.0, 1.0]])
    got = classify.classification_metrics((logits, np.array([0, 1, 1, 1])))
    f1 = (2 * 0.5 * 1 / 1.5 + 2 * 1 * (2 / 3) / (1 + 2 / 3)) / 2
    assert got == pytest.approx({"accuracy": 0.75, "precision": 0.75, "recall": (1 + 2 / 3) / 2, "f1": f1})
    assert classify.regression_metrics((np.array([[1.0], [3.0]]), np.array([2.0, 2.0]))) == {"mse": 1.0, "mae": 1.0}


def test_balanced_class_weights_by_hand():
    from launcher import recipe as recipes

    recipe = recipes.load(str(SENTIMENT), {"head.class_weights": "balanced"})
    rows = {"label": ["negative", "positive", "positive", 1]}  # 1 negative, 3 positive, by name or by id
    assert classify.class_weights(recipe, rows) == pytest.approx([4 / (2 * 1), 4 / (2 * 3)])


def test_evaluate_refuses_a_directory_that_is_not_a_model(tmp_path):
    assert_rejected(cli("evaluate", tmp_path, "--data", REPO / "recipes/sentiment/data/eval.jsonl"), str(tmp_path),
                    "no config.json")


def test_evaluate_refuses_missing_data(tmp_path):
    assert_rejected(cli("evaluate", BASE, "--data", tmp_path / "nope.jsonl"), "--data", "does not exist")


def test_evaluate_names_the_bad_row(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"text": "fine", "label": "positive"}) + "\n" + json.dumps({"text": "x"}) + "\n")
    model = tmp_path / "model"
    shutil.copytree(BASE, model)
    config = json.loads((model / "config.json").read_text())
    config.update(architectures=["BertForSequenceClassification"], id2label={"0": "negative", "1": "positive"})
    (model / "config.json").write_text(json.dumps(config))
    assert_rejected(cli("evaluate", model, "--data", data), str(data), "row 2", "no 'label'")


def test_the_task_is_overridden_on_the_command_line_like_any_key(tmp_path):
    plan = plan_json(sentiment_recipe(tmp_path), "--task=regression", "--head.labels=[]")
    assert plan["recipe"]["task"] == "regression"
    assert_rejected(cli("plan", sentiment_recipe(tmp_path), "--tsk=regression"), "--tsk", "did you mean 'task'")
