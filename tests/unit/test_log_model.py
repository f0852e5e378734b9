"""wandb.log_model: the worker uploads only a final/ it consolidated itself. Under Slurm the training step runs
with consolidation off, and a final/ already there is an older run's (the job's upload step sends the new one)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from launcher import train


@pytest.mark.parametrize("consolidate", [False, True])
def test_the_worker_uploads_only_the_final_model_it_consolidated(tmp_path, monkeypatch, consolidate):
    (tmp_path / "final").mkdir()  # stale: from an earlier end of this run
    (tmp_path / "final" / "config.json").write_text("{}")
    uploads, merged = [], []
    monkeypatch.setattr(train, "resolve_checkpoint", lambda run_dir: run_dir / "checkpoints" / "checkpoint-9")
    monkeypatch.setattr(train.tracking, "log_model", lambda run, model_dir, name: uploads.append(model_dir))
    monkeypatch.setattr("launcher.consolidate.consolidate", lambda *args, **kwargs: merged.append(args))
    monkeypatch.setattr("transformers.integrations.deepspeed.unset_hf_deepspeed_config", lambda: None)
    built = SimpleNamespace(stopper=None, throughput=None, trainer=SimpleNamespace(state=SimpleNamespace(log_history=[],
                                                                                          global_step=9)))
    recipe = SimpleNamespace(run=SimpleNamespace(consolidate=consolidate, name="demo", score_answers=0),
                             wandb=SimpleNamespace(log_model=True))
    tracker = SimpleNamespace(finish=lambda: None)
    train.finish(built, SimpleNamespace(run_dir=tmp_path, recipe=recipe), tracker, rank=0)
    assert uploads == ([tmp_path / "final"] if consolidate else [])
    assert len(merged) == consolidate
