"""`launcher evaluate` on a language model whose chat template has no {% generation %} markers: it scores every
token, as the trainer does then, instead of finding none to score (the word "generation" in
`add_generation_prompt` is not a marker)."""

from __future__ import annotations

import json

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
