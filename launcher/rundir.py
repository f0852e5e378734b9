"""The run directory: what ran (recipe, DeepSpeed JSON, command, versions, commit) next to its checkpoints."""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
from importlib import metadata
from pathlib import Path

import yaml

from launcher import schema
from launcher.errors import RecipeError

PACKAGES = ("launcher", "torch", "transformers", "trl", "peft", "deepspeed", "accelerate", "datasets", "wandb")


def prepare(run_dir: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        write_atomic(run_dir / name, text)


def changes_since_start(run_dir: Path, recipe_yaml: str) -> list[str]:
    """The keys changed since the run started ('key: old -> new'), when none of them identifies the experiment
    (schema.identifies); a change to one that does would mix two experiments in one run: refused, naming it."""
    stored = run_dir / "recipe.yaml"
    if not stored.is_file():
        return []
    before, now = yaml.safe_load(stored.read_text()), yaml.safe_load(recipe_yaml)
    if not isinstance(before, dict):
        raise RecipeError(f"{stored}: not a recipe this launcher wrote; move it away or use a new run.name")
    changed = _differences(before, now)
    for key, old, new in changed:
        numbers = isinstance(old, (int, float)) and isinstance(new, (int, float))
        if schema.identifies(key) or (key in schema.GROW_ONLY and numbers and 0 < new < old):
            raise RecipeError(f"{stored}: this run started with a different recipe ({key} changed: {old!r} -> "
                              f"{new!r}); resuming would mix two experiments: use a new run.name or run.output_dir")
    return [f"{key}: {old!r} -> {new!r}" for key, old, new in changed]


def _differences(a, b, path: str = "") -> list[tuple[str, object, object]]:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = list(a) + [k for k in b if k not in a]
        return [d for k in keys for d in _differences(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))]
    return [] if a == b else [(path, a, b)]


def write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so readers (and other nodes) never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}"
    with open(tmp, "x") as f:  # not mkstemp, whose 0600 hides the run from the team: the mode follows the umask
        f.write(text)
    os.replace(tmp, path)


def record_environment(run_dir: Path) -> None:
    """Package versions and the git commit of the working directory, for reproducing the run."""
    info = {"versions": {p: _version(p) for p in PACKAGES}, "git": _git(), "host": socket.gethostname()}
    write_atomic(run_dir / "environment.json", json.dumps(info, indent=2) + "\n")


def record_rank(run_dir: Path, rank: int, world: int, ds_config: dict) -> None:
    """Each rank writes the DeepSpeed config its engine was given: evidence of what every rank ran."""
    import torch

    info = {"rank": rank, "world_size": world, "host": socket.gethostname(), "threads": torch.get_num_threads(),
            "visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "deepspeed": ds_config}
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
