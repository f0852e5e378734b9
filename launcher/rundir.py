"""The run directory: what ran (recipe, DeepSpeed JSON, command, versions, commit) next to its checkpoints."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path

from launcher.errors import RecipeError

PACKAGES = ("launcher", "torch", "transformers", "trl", "peft", "deepspeed", "accelerate", "datasets", "wandb")


def checkpoints_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def refuse_used(run_dir: Path) -> None:
    """A run directory that holds checkpoints belongs to another run: never train over it."""
    existing = sorted(checkpoints_dir(run_dir).glob("checkpoint-*"))
    if existing:
        raise RecipeError(f"{run_dir}: run directory already holds checkpoints ({existing[-1].name}); "
                          "pick another run.name or run.output_dir, or move it away")


def prepare(run_dir: Path, files: dict[str, str]) -> None:
    """Create the run directory and write `files`, unless it belongs to another run."""
    refuse_used(run_dir)
    for name, text in files.items():
        write_atomic(run_dir / name, text)


def write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so readers (and other nodes) never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def record_environment(run_dir: Path) -> None:
    """Package versions and the git commit of the working directory, for reproducing the run."""
    info = {"versions": {p: _version(p) for p in PACKAGES}, "git": _git(), "host": socket.gethostname()}
    write_atomic(run_dir / "environment.json", json.dumps(info, indent=2) + "\n")


def record_rank(run_dir: Path, rank: int, world: int, ds_config: dict) -> None:
    """Each rank writes the DeepSpeed config its engine was given: evidence of what every rank ran."""
    info = {"rank": rank, "world_size": world, "host": socket.gethostname(), "deepspeed": ds_config}
    write_atomic(run_dir / "ranks" / f"rank{rank}.json", json.dumps(info, indent=2) + "\n")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _git() -> dict | None:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True, timeout=10).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return None
