"""Checkpoints are complete or invisible.

A checkpoint counts only once its marker exists: the marker is written by rank 0 after every rank has saved and
flushed its files (launcher/callbacks.py). Neither DeepSpeed's `latest` tag (written before all ranks are done) nor
the highest `checkpoint-N` (HF's `get_last_checkpoint`) says that. Resuming, consolidating and retention all go by
the marker, so a checkpoint cut short by a crash is reported and skipped, never loaded and never counted.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from launcher.errors import RecipeError

MARKER = "complete.json"
MIN_KEPT = 2  # never fewer: the newest complete checkpoint may turn out unreadable


def directory(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def listing(run_dir: Path) -> list[Path]:
    """checkpoint-N directories of a run, oldest first."""
    found = [p for p in directory(run_dir).glob("checkpoint-*") if p.is_dir() and p.name[11:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[11:]))


def is_complete(checkpoint: Path) -> bool:
    return (checkpoint / MARKER).is_file()


def complete(run_dir: Path) -> list[Path]:
    return [c for c in listing(run_dir) if is_complete(c)]


def marker(checkpoint: Path) -> dict:
    return json.loads((checkpoint / MARKER).read_text())


def finished(checkpoint: Path, max_steps: int | None = None) -> bool:
    """Saved at the last step of training: the recipe's max_steps when it gives one (it may have grown since),
    else the trainer's own count when it saved."""
    info = marker(checkpoint)
    goal = max_steps if max_steps and max_steps > 0 else info.get("max_steps", float("inf"))
    return info.get("step", 0) >= goal


def resume_point(run_dir: Path, resume: str, world: int, requeued: bool = False) -> Path | None:
    """The checkpoint this start continues from, or None for a fresh start.

    run.resume (auto | never | PATH) is for the first start: once the run directory holds complete checkpoints of
    its own, a requeued job always continues from the newest, and so does a start with a PATH from elsewhere (PATH
    applied again would throw away the progress since). A PATH inside the run directory rolls back to it."""
    if resume == "never" and not requeued:
        if found := listing(run_dir):
            raise RecipeError(f"{run_dir}: run directory already holds checkpoints ({found[-1].name}); "
                              "continue it with --run.resume=auto, or pick another run.name or run.output_dir")
        return None
    own, path = complete(run_dir), None if resume in ("auto", "never") else Path(resume)
    rollback = path is not None and not requeued and path.parent == directory(run_dir)
    checkpoint = path if rollback or not own else own[-1]
    if checkpoint is None:
        return None
    if not is_complete(checkpoint):
        raise RecipeError(f"{checkpoint}: run.resume names a directory that is not a complete checkpoint "
                          f"(no {MARKER}); give a checkpoint-N directory written by this launcher")
    if (saved_world := marker(checkpoint).get("world_size")) != world:
        raise RecipeError(f"{checkpoint}: saved by {saved_world} ranks, this run has {world}; ZeRO optimizer state "
                          f"is sharded per rank, so resume with {saved_world} ranks (changing the world size needs "
                          "DeepSpeed's universal checkpoints, python -m deepspeed.checkpoint.ds_to_universal, which "
                          "this launcher does not load yet)")
    return checkpoint


def set_aside(run_dir: Path) -> list[Path]:
    """Move incomplete checkpoints out of the way (to <run>/incomplete/), keeping them for inspection."""
    checkpoints = [c for c in listing(run_dir) if not is_complete(c)]
    moved = [run_dir / "incomplete" / f"{c.name}-{time.strftime('%Y%m%d-%H%M%S')}" for c in checkpoints]
    for checkpoint, target in zip(checkpoints, moved, strict=True):
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(checkpoint, target)
    return moved


def mark_complete(checkpoint: Path, info: dict) -> None:
    """Write the marker last, durably: the file and the directory entry reach the disk before we go on."""
    tmp = checkpoint / f".{MARKER}.tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps(info, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, checkpoint / MARKER)
    fd = os.open(checkpoint, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def retain(run_dir: Path, limit: int | None) -> list[Path]:
    """Delete the oldest complete checkpoints beyond max(limit, 2); incomplete ones are not counted or touched."""
    doomed = [] if limit is None else complete(run_dir)[: -max(limit, MIN_KEPT)]
    for checkpoint in doomed:
        shutil.rmtree(checkpoint)
    return doomed
