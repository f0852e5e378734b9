"""curves.png: a real image of the run's curves, read back; the model card embeds it; without matplotlib, a line."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from launcher import curves, model_card

HISTORY = [{"step": s, "loss": 3.0 / s} for s in range(1, 41)] + \
    [{"step": s, "eval_loss": 2.0 / s ** 0.5, "eval_exact_match": min(1.0, s / 40)} for s in (10, 20, 30, 40)]


def test_the_curves_are_a_real_picture_of_the_losses_and_metrics(tmp_path):
    out = tmp_path / "curves.png"
    assert curves.write(HISTORY, out, "smoke") == f"curves:        {out}"
    image = np.asarray(Image.open(out).convert("RGB"))
    assert image.shape[0] >= 300 and image.shape[1] >= 800  # two panels: losses, eval metrics
    left, right = image[:, : image.shape[1] // 2], image[:, image.shape[1] // 2 :]
    for panel in (left, right):  # each panel has coloured lines drawn on it, not only white, black and grey
        rgb = panel.reshape(-1, 3).astype(int)
        coloured = (rgb.max(axis=1) - rgb.min(axis=1)) > 60
        assert coloured.sum() > 500, coloured.sum()


def test_without_eval_metrics_one_panel(tmp_path):
    out = tmp_path / "curves.png"
    curves.write([e for e in HISTORY if "loss" in e], out, "smoke")
    width = Image.open(out).size[0]
    assert width <= 700


def test_without_matplotlib_the_run_says_where_the_plot_would_be(tmp_path, monkeypatch):
    monkeypatch.setattr(curves, "pyplot", lambda: None)
    line = curves.write(HISTORY, tmp_path / "curves.png", "smoke")
    assert "pip install matplotlib" in line and str(tmp_path / "curves.png") in line
    assert not (tmp_path / "curves.png").exists()


def test_the_model_card_embeds_the_runs_curves(tmp_path):
    run_dir, out = tmp_path / "run", tmp_path / "final"
    checkpoint = run_dir / "checkpoints" / "checkpoint-40"
    checkpoint.mkdir(parents=True)
    out.mkdir()
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 40, "log_history": HISTORY}))
    curves.write(HISTORY, run_dir / curves.FILE, "smoke")
    model_card.write(out, checkpoint, 40)
    assert "![training and eval curves](curves.png)" in (out / "README.md").read_text()
    assert (out / "curves.png").read_bytes() == (run_dir / "curves.png").read_bytes()
