"""Classification with frozen layers on 2 CPU ranks: the shipped sentiment recipe learns its reviews well above
chance under ZeRO-3, consolidates into a model AutoModelForSequenceClassification loads with its label names and
untouched frozen weights, and `launcher evaluate` scores it as the trainer did. ZeRO-2 with class weights too."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import BASE, REPO, assert_every_rank_wrote_shards, cli, history_of, launch, records, sentiment_recipe

pytestmark = pytest.mark.integration

EVAL = REPO / "recipes" / "sentiment" / "data" / "eval.jsonl"


def final_weights(final: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForSequenceClassification

    model, info = AutoModelForSequenceClassification.from_pretrained(final, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return dict(model.named_parameters()), model


def last_eval(run_dir: Path) -> dict:
    state = json.loads((run_dir / "checkpoints" / "trainer_state.json").read_text())
    return [e for e in state["log_history"] if "eval_loss" in e][-1]


def test_sentiment_zero3_with_frozen_layers_learns_consolidates_and_evaluates(tmp_path):
    # as shipped (ZeRO-3, embeddings and layers 0-2 of 4 frozen), tracked by W&B offline
    recipe = sentiment_recipe(tmp_path, wandb={"project": "launcher-tests", "mode": "offline"})
    result, _ = launch(recipe, "--nproc_per_node", 2)
    run_dir = tmp_path / "run"
    assert_every_rank_wrote_shards(run_dir, 2)
    final = last_eval(run_dir)
    assert final["eval_accuracy"] > 0.75 and final["eval_f1"] > 0.75, final  # chance is 0.5
    (wandb_file,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    history = history_of(records(wandb_file))
    evals = [h for h in history if "eval/accuracy" in h]
    assert evals and evals[-1]["eval/accuracy"] == pytest.approx(final["eval_accuracy"])
    assert all(k in evals[-1] for k in ("eval/precision", "eval/recall", "eval/f1"))
    assert any(h.get("train/tokens_per_second", 0) > 0 for h in history)
    assert "freeze: 0.04 M of 0.16 M parameters trainable" in result.stdout

    weights, model = final_weights(run_dir / "final")
    assert model.config.id2label == {0: "negative", 1: "positive"}
    base = load_file(str(BASE / "model.safetensors"))
    for name, tensor in base.items():  # frozen: present and bit for bit the base's; trained: changed
        ours = weights[f"bert.{name}"]
        frozen = "embeddings." in name or any(f"layer.{i}." in name for i in range(3))
        assert torch.equal(ours, tensor) == frozen, name

    evaluated = cli("evaluate", run_dir / "final", "--data", EVAL, "--output", tmp_path / "metrics.json")
    assert evaluated.returncode == 0, evaluated.stderr
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["rows"] == 200 and metrics["labels"] == ["negative", "positive"]
    for key in ("accuracy", "f1", "precision", "recall"):
        assert metrics[key] == pytest.approx(final[f"eval_{key}"], abs=1e-6), key
    assert metrics["loss"] == pytest.approx(final["eval_loss"], abs=1e-4)
    assert f"accuracy   {metrics['accuracy']:.4f}" in evaluated.stdout


def test_zero2_with_class_weights_and_a_frozen_pattern(tmp_path):
    recipe = sentiment_recipe(tmp_path, deepspeed={"config": str(REPO / "ds_configs/zero2.json")},
                              head={"class_weights": "balanced"},
                              freeze={"all_but_last": None, "patterns": ["*.embeddings.*", "*.layer.0.*"]},
                              training={"max_steps": 80, "eval_steps": 80, "save_steps": 80})
    launch(recipe, "--nproc_per_node", 2)
    run_dir = tmp_path / "run"
    assert_every_rank_wrote_shards(run_dir, 2)
    assert last_eval(run_dir)["eval_accuracy"] > 0.6
    weights, _ = final_weights(run_dir / "final")
    base = load_file(str(BASE / "model.safetensors"))
    for name, tensor in base.items():
        frozen = name.startswith(("embeddings.", "encoder.layer.0."))
        assert torch.equal(weights[f"bert.{name}"], tensor) == frozen, name
