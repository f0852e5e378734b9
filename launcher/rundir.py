"""The run directory: what ran (recipe, DeepSpeed JSON, command, versions, commit) next to its checkpoints."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path

import yaml

from launcher.errors import RecipeError

PACKAGES = ("launcher", "torch", "transformers", "trl", "peft", "deepspeed", "accelerate", "datasets", "wandb")


def prepare(run_dir: Path, files: dict[str, str]) -> None:
    """Create the run directory and write `files` (a resumed run has passed check_same_recipe first)."""
    for name, text in files.items():
        write_atomic(run_dir / name, text)


def check_same_recipe(run_dir: Path, recipe_yaml: str) -> None:
    """Continuing a run under a changed recipe would mix two experiments in one run: refuse, naming the key."""
    stored = run_dir / "recipe.yaml"
    if not stored.is_file():
        return
    before, now = yaml.safe_load(stored.read_text()), yaml.safe_load(recipe_yaml)
    for run in (before, now):
        for key in ("resume", "consolidate"):  # how the run starts and ends, not what it trains
            run.get("run", {}).pop(key, None)
    key = _first_difference(before, now)
    if key is not None:
        raise RecipeError(f"{stored}: this run started with a different recipe ({key or 'recipe'} changed); "
                          "resuming would mix two experiments: use a new run.name or run.output_dir")


def _first_difference(a, b, path: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            found = _first_difference(a.get(key), b.get(key), f"{path}.{key}" if path else str(key))
            if found is not None:
                return found
        return None
    return None if a == b else path


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
