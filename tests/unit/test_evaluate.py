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
