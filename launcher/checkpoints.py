"""Checkpoints are complete or invisible.

A checkpoint counts only once its marker exists: the marker is written by rank 0 after every rank has saved and
flushed its files (launcher/callbacks.py). Neither DeepSpeed's `latest` tag (written before all ranks are done) nor
the highest `checkpoint-N` (HF's `get_last_checkpoint`) says that. Resuming, consolidating and retention all go by
the marker, so a checkpoint cut short by a crash is reported and skipped, never loaded and never counted.

The marker lists every file with its size, and resuming and consolidating check the files against it: a checkpoint
copied in part, truncated or written into again since is refused, never half-loaded. DeepSpeed unpickles its shard
files when it resumes (torch.load with weights_only=False): the check makes sure they are the files this launcher's
ranks wrote, not that they are safe; a checkpoint from someone else is as trustworthy as its author.
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
    try:
        return json.loads((checkpoint / MARKER).read_text())
    except ValueError:
        raise RecipeError(f"{checkpoint / MARKER}: not valid JSON; the checkpoint is not known to be complete: "
                          "move it away") from None


def files(checkpoint: Path) -> dict[str, int]:
    """Size of every file of a checkpoint but its marker, by relative path. Each is opened to read its size: on NFS
    that revalidates attributes cached on this host before another host finished writing the file."""
    sizes = {}
    for root, _, names in os.walk(checkpoint):
        for name in names:
            relative = (Path(root) / name).relative_to(checkpoint).as_posix()
            if relative not in (MARKER, f".{MARKER}.tmp"):
                with open(checkpoint / relative, "rb") as f:
                    sizes[relative] = os.fstat(f.fileno()).st_size
    return dict(sorted(sizes.items()))


def verify(checkpoint: Path) -> None:
    """The files are those the marker lists, each of its size. Markers from before the list are taken as they are."""
    for relative, size in (marker(checkpoint).get("files") or {}).items():
        path = checkpoint / relative
        found = path.stat().st_size if path.is_file() else None
        if found != size:
            state = "is missing" if found is None else f"has {found} bytes, {size} when it was completed"
            raise RecipeError(f"{checkpoint}: {relative} {state}; the checkpoint changed after its {MARKER} was "
                              "written (copied in part, or saved into again): move it away, or give another")


def finished(checkpoint: Path, max_steps: int | None = None) -> bool:
    """Saved at the last step of training: the recipe's max_steps when it gives one (it may have grown since),
    else the trainer's own count when it saved."""
    info = marker(checkpoint)
    goal = max_steps if max_steps and max_steps > 0 else info.get("max_steps", float("inf"))
    return info.get("step", 0) >= goal


def resume_point(run_dir: Path, resume: str, requeued: bool = False) -> Path | None:
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
    verify(checkpoint)  # DeepSpeed unpickles the shards it loads: they must be the files the marker vouches for
    return checkpoint


def set_aside(run_dir: Path) -> list[Path]:
    """Move incomplete checkpoints out of the way (to <run>/incomplete/), keeping them for inspection."""
    return _move([c for c in listing(run_dir) if not is_complete(c)], run_dir / "incomplete")


def set_aside_after(run_dir: Path, step: int) -> list[Path]:
    """Move the checkpoints newer than `step` (where training continues) to <run>/rolled-back/. Only a rollback
    leaves any: they belong to the abandoned continuation, and resume, retention and consolidation would take them
    for the newest, and retention would delete the new ones first."""
    return _move([c for c in listing(run_dir) if int(c.name[11:]) > step], run_dir / "rolled-back")


def _move(checkpoints: list[Path], folder: Path) -> list[Path]:
    moved = [folder / f"{c.name}-{time.strftime('%Y%m%d-%H%M%S')}" for c in checkpoints]
    for checkpoint, target in zip(checkpoints, moved, strict=True):
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(checkpoint, target)
    return moved


def mark_complete(checkpoint: Path, info: dict) -> None:
    """Write the marker last, durably: the file and the directory entry reach the disk before we go on."""
    tmp = checkpoint / f".{MARKER}.tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps({**info, "files": files(checkpoint)}, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, checkpoint / MARKER)
    sync_dir(checkpoint)


def unmark(checkpoint: Path) -> None:
    """Withdraw the marker, durably, before anything is saved into the checkpoint again."""
    if (checkpoint / MARKER).exists():
        (checkpoint / MARKER).unlink()
        sync_dir(checkpoint)


def sync_dir(directory: Path) -> None:
    """fsync a directory: the entries created, renamed or removed in it reach the disk."""
    fd = os.open(directory, os.O_RDONLY)
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
