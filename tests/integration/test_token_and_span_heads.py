"""The head tasks beyond sequence classification, on 2 CPU ranks through the real launcher: the shipped NER recipe
learns entities under ZeRO-3 and `launcher evaluate` scores its consolidated model as the trainer did; a LoRA
classifier consolidates into one model whose logits are the base's plus the adapter's."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import BASE, REPO, cli, launch, sentiment_recipe, shipped_recipe

pytestmark = pytest.mark.integration

NER = REPO / "recipes" / "ner.yaml"


def last_eval(run_dir) -> dict:
    state = json.loads((run_dir / "checkpoints" / "trainer_state.json").read_text())
    return [e for e in state["log_history"] if "eval_loss" in e][-1]


def test_ner_recipe_learns_entities_and_evaluate_agrees(tmp_path):
    from transformers import AutoModelForTokenClassification

    launch(shipped_recipe(NER, tmp_path), "--nproc_per_node", 2)
    run_dir = tmp_path / "run"
    final = last_eval(run_dir)
    assert final["eval_f1"] >= 0.8, final  # chance: near 0 (an entity counts only with its type and every word)
    model = AutoModelForTokenClassification.from_pretrained(run_dir / "final")
    assert model.config.id2label[1] == "B-PER" and model.config.trained_max_length == 64  # evaluate cuts rows there
    evaluated = cli("evaluate", run_dir / "final", "--data", REPO / "recipes/ner/data/eval.jsonl",
                    "--output", tmp_path / "metrics.json")
    assert evaluated.returncode == 0, evaluated.stderr
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("f1", "precision", "recall", "accuracy"):
        assert metrics[key] == pytest.approx(final[f"eval_{key}"], abs=1e-9), key


def test_lora_classifier_consolidates_to_base_plus_adapter(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    recipe = sentiment_recipe(tmp_path, drop=("freeze.all_but_last",), lora={"r": 8},
                              deepspeed={"overrides": {"zero_optimization": {
                                  "stage3_gather_16bit_weights_on_model_save": True}}},
                              training={"max_steps": 40, "eval_steps": 40, "save_steps": 40})
    text = recipe.read_text().replace("freeze: {}\n", "")
    recipe.write_text(text)
    launch(recipe, "--nproc_per_node", 2)
    final = tmp_path / "run" / "final"
    merged = AutoModelForSequenceClassification.from_pretrained(final).eval()
    assert merged.config.id2label == {0: "negative", 1: "positive"}
    assert merged.config.trained_max_length == 32  # the recipe's training.max_length, for evaluate
    base = AutoModelForSequenceClassification.from_pretrained(BASE, num_labels=2)
    adapted = PeftModel.from_pretrained(base, final / "adapter").eval()
    tokenizer = AutoTokenizer.from_pretrained(final)
    batch = tokenizer(["The plot was not great.", "This film was superb!"], padding=True, return_tensors="pt")
    with torch.no_grad():
        ours, theirs = merged(**batch).logits, adapted(**batch).logits
    assert torch.allclose(ours, theirs, atol=1e-5), (ours, theirs)
    head = adapted.base_model.model.classifier.modules_to_save["default"].weight
    assert not torch.equal(head, base.classifier.original_module.weight)  # the new head trained, in full


def test_qa_recipe_reads_long_contexts_in_windows_and_evaluate_agrees(tmp_path):
    from transformers import AutoModelForQuestionAnswering

    launch(shipped_recipe(REPO / "recipes" / "qa.yaml", tmp_path), "--nproc_per_node", 2)
    run_dir = tmp_path / "run"
    final = last_eval(run_dir)
    assert final["eval_exact_match"] >= 0.7, final  # chance: near 0 (the span must match exactly)
    model = AutoModelForQuestionAnswering.from_pretrained(run_dir / "final")
    assert model.config.qa_windows == {"max_length": 48, "stride": 12}
    evaluated = cli("evaluate", run_dir / "final", "--data", REPO / "recipes/qa/data/eval.jsonl",
                    "--output", tmp_path / "metrics.json")
    assert evaluated.returncode == 0, evaluated.stderr
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["windows"] > metrics["rows"]  # some contexts needed more than one window
    for key in ("exact_match", "f1"):
        assert metrics[key] == pytest.approx(final[f"eval_{key}"], abs=1e-9), key
