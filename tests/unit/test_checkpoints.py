"""Retention and resume go by completion markers: never fewer than two complete checkpoints kept, the only complete
one never deleted, half-written ones neither counted nor loaded."""

from __future__ import annotations

from pathlib import Path

from launcher import checkpoints


def make(run_dir: Path, step: int, complete: bool) -> Path:
    path = checkpoints.directory(run_dir) / f"checkpoint-{step}"
    path.mkdir(parents=True)
    if complete:
        checkpoints.mark_complete(path, {"step": step, "max_steps": 100, "world_size": 2})
    return path


def names(run_dir: Path) -> list[str]:
    return [p.name for p in checkpoints.listing(run_dir)]


def test_retention_keeps_two_complete_checkpoints_whatever_the_limit(tmp_path):
    for step in (10, 20, 30, 40):
        make(tmp_path, step, complete=True)
    removed = checkpoints.retain(tmp_path, 1)
    assert [p.name for p in removed] == ["checkpoint-10", "checkpoint-20"]
    assert names(tmp_path) == ["checkpoint-30", "checkpoint-40"]


def test_retention_never_counts_or_deletes_half_written_checkpoints(tmp_path):
    make(tmp_path, 10, complete=True)
    for step in (20, 30, 40):  # cut short: no marker
        make(tmp_path, step, complete=False)
    assert checkpoints.retain(tmp_path, 1) == []
    assert names(tmp_path) == ["checkpoint-10", "checkpoint-20", "checkpoint-30", "checkpoint-40"]
    assert checkpoints.resume_point(tmp_path, "auto", 2).name == "checkpoint-10"
