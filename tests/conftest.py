"""Shared helpers: the repo root, a CLI runner, and recipes derived from the smoke recipe."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "recipes" / "smoke.yaml"

# Hermetic runs: no hub look-ups (there is no network here, and a look-up that hangs instead of failing would stall a
# test), and Hugging Face caches of this test session only, so nothing a previous run left behind is read back.
# Every process the tests start inherits this.
os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_NO_ADVISORY_WARNINGS="1")
if "LAUNCHER_TEST_CACHE" not in os.environ:
    import tempfile

    os.environ["LAUNCHER_TEST_CACHE"] = tempfile.mkdtemp(prefix="launcher-test-cache-")
os.environ["HF_HOME"] = os.environ["LAUNCHER_TEST_CACHE"]
# DeepSpeed's C++ ops (built on first use by scripts that start DeepSpeed directly) go there too: a build killed in
# an earlier run leaves a lock file in ~/.cache/torch_extensions that torch waits on forever.
os.environ["TORCH_EXTENSIONS_DIR"] = os.path.join(os.environ["LAUNCHER_TEST_CACHE"], "torch_extensions")


def cli(*args: str, cwd: Path = REPO, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `python -m launcher ARGS` as a user would, capturing output."""
    return subprocess.run([sys.executable, "-m", "launcher", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def shipped_recipe(source: Path, tmp_path: Path, name: str = "recipe.yaml", drop: tuple[str, ...] = (),
                   **sections) -> Path:
    """A shipped recipe with sections updated (dicts) or replaced, `drop` keys ("run.name") removed, written to
    tmp_path with absolute paths and its run directory there."""
    raw = yaml.safe_load(source.read_text())
    raw["model"]["name_or_path"] = str(REPO / raw["model"]["name_or_path"])
    for spec in [*raw["data"]["train"], *raw["data"].get("eval", [])]:
        spec["path"] = str(REPO / spec["path"])
    raw["deepspeed"]["config"] = str(REPO / raw["deepspeed"]["config"])
    raw["run"]["output_dir"] = str(tmp_path / "run")
    for section, value in sections.items():
        if isinstance(value, dict) and isinstance(raw.get(section), dict):
            raw[section].update(value)
        else:
            raw[section] = value
    for dotted in drop:
        section, key = dotted.split(".")
        del raw[section][key]
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def smoke_recipe(tmp_path: Path, name: str = "recipe.yaml", drop: tuple[str, ...] = (), **sections) -> Path:
    return shipped_recipe(SMOKE, tmp_path, name, drop, **sections)


@pytest.fixture
def recipe_factory(tmp_path):
    return lambda drop=(), **sections: smoke_recipe(tmp_path, drop=drop, **sections)
