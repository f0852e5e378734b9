"""`launcher evaluate` on a language model whose chat template has no {% generation %} markers: it scores every
token, as the trainer does then, instead of finding none to score (the word "generation" in
`add_generation_prompt` is not a marker)."""

from __future__ import annotations

import json

import pytest

from launcher import tiny
from tests.helpers import REPO, cli

STAND_IN = REPO / "recipes" / "stand-ins"


def test_template_without_markers_scores_every_token(tmp_path):
    config = json.loads((REPO / "recipes" / "llama-3.1-8b" / "config.json").read_text())
    tiny.write(config, str(STAND_IN / "llama-3.1-tokenizer"), tmp_path / "model")
    template = (tmp_path / "model" / "chat_template.jinja")
    assert "add_generation_prompt" in template.read_text() and "{% generation %}" not in template.read_text()
    result = cli("evaluate", tmp_path / "model", "--data", STAND_IN / "ultrachat_sample.jsonl", "--max_rows", 4,
                 "--prompts", 0, "--output", tmp_path / "metrics.json")
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["rows"] == 4 and metrics["loss"] > 0, metrics


def test_device_and_dtype_follow_the_machine_and_the_saved_model():
    from launcher.evaluate import device_and_dtype

    assert device_and_dtype({"dtype": "bfloat16"}, cuda=True) == ("cuda", "bfloat16")
    assert device_and_dtype({"dtype": "bfloat16"}, cuda=False) == ("cpu", "bfloat16")
    assert device_and_dtype({"torch_dtype": "float16"}, cuda=True) == ("cuda", "float16")  # the older key
    assert device_and_dtype({}, cuda=False) == ("cpu", "float32")


def test_a_bf16_model_is_evaluated_in_bf16_and_in_batches(tmp_path, monkeypatch):
    """Loaded in its config's dtype (bf16 matmuls run on this CPU), the loss that of the fp32 model within bf16's
    precision; batch_size rows go through each forward pass, for the loss and for generation, with the same loss and
    answers as one row at a time."""
    import torch

    from launcher import evaluate

    config = json.loads((REPO / "recipes" / "llama-3.1-8b" / "config.json").read_text())
    tiny.write(config, str(STAND_IN / "llama-3.1-tokenizer"), tmp_path / "model")
    saved = json.loads((tmp_path / "model" / "config.json").read_text())
    (tmp_path / "model" / "config.json").write_text(json.dumps({**saved, "dtype": "bfloat16"}))
    widths = []  # the batch size of every forward pass
    load = evaluate.auto_class_for

    def counting(config):
        class Loader:
            @staticmethod
            def from_pretrained(*args, **kwargs):
                model = load(config).from_pretrained(*args, **kwargs)
                model.register_forward_pre_hook(lambda m, a, kw: widths.append(kw["input_ids"].shape[0]),
                                                with_kwargs=True)
                return model
        return Loader

    monkeypatch.setattr(evaluate, "auto_class_for", counting)
    data = STAND_IN / "ultrachat_sample.jsonl"
    run = lambda out, batch: evaluate.evaluate(str(tmp_path / "model"), str(data), max_rows=6, prompts=4,  # noqa: E731
                                               max_new_tokens=4, batch_size=batch, output=str(tmp_path / out))
    batched = run("batched.json", 4)
    assert batched["dtype"] == "bfloat16" and batched["device"] == "cpu"
    # loss: 6 rows as 4 + 2; generation: every row's prompt, as 4 + 2 again (each batch one forward per new token)
    assert widths[:3] == [4, 2, 4] and widths[-1] == 2 and set(widths) == {4, 2}, widths
    assert batched["answered"] == 6 and len(batched["samples"]) == 4
    widths.clear()
    single = run("single.json", 1)
    assert set(widths) == {1}
    assert abs(batched["loss"] - single["loss"]) < 1e-2 * single["loss"], (batched["loss"], single["loss"])
    assert [s["generated"] for s in batched["samples"]] == [s["generated"] for s in single["samples"]]
    (tmp_path / "model" / "config.json").write_text(json.dumps({**saved, "dtype": "float32"}))
    full = run("fp32.json", 4)
    assert full["dtype"] == "float32" and abs(batched["loss"] - full["loss"]) < 2e-2 * full["loss"], (batched, full)
    assert torch.get_default_dtype() == torch.float32


def test_a_classifier_is_evaluated_at_the_length_it_was_trained_to(tmp_path):
    """The trainer cut rows at training.max_length (8 here); the tokenizer would let 64 through. evaluate reads the
    length from the model's config, so its loss is the model's own loss on rows cut at 8 tokens."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from launcher import evaluate
    from launcher.modeling import LENGTH_KEY

    shipped = REPO / "recipes" / "sentiment" / "model"
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(shipped, num_labels=2,
                                                               id2label={0: "negative", 1: "positive"})
    torch.nn.init.normal_(model.classifier.weight, std=3.0)  # a head that tells the texts apart, as a trained one does
    setattr(model.config, LENGTH_KEY, 8)
    model.save_pretrained(tmp_path / "model")
    tokenizer = AutoTokenizer.from_pretrained(shipped)
    tokenizer.save_pretrained(tmp_path / "model")
    texts = ["The cast was brilliant and the music was lovely, and the ending stayed with me for days.",
             "The plot was dull, the jokes fell flat and the whole thing went on far too long, sadly."]
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"text": t, "label": g}) + "\n" for t, g in zip(texts, ["positive", "negative"])))
    metrics = evaluate.evaluate(str(tmp_path / "model"), str(rows), output=str(tmp_path / "metrics.json"))

    def loss(length):
        batch = tokenizer(texts, truncation=True, max_length=length, padding=True, return_tensors="pt")
        with torch.no_grad():
            return model.eval()(**batch, labels=torch.tensor([1, 0])).loss.item()

    assert tokenizer.model_max_length == 64 and len(tokenizer(texts[0])["input_ids"]) > 8
    assert metrics["loss"] == pytest.approx(loss(8), abs=1e-5)
    assert abs(loss(8) - loss(64)) > 1e-3  # the length matters to the score
