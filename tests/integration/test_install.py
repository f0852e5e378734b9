"""The package is self-contained: a wheel of the checkout, installed (not editable) and run from a directory outside
the checkout, finds its job template, DeepSpeed configs and dry-run stand-ins as package data, and a recipe written
there names a shipped DeepSpeed config by name."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO

pytestmark = pytest.mark.integration

# What a wheel is built from: the checkout less what is not source (the venv, caches, runs, build outputs).
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "runs", "wandb", "*.egg-info", "__pycache__",
                                    ".pytest_cache", ".ruff_cache", "out")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The wheel of the checkout, installed with `pip install --target`: its directory, for PYTHONPATH. Built from
    a copy (symlinks kept as symlinks), so the build's build/ and *.egg-info do not land in the checkout."""
    root = tmp_path_factory.mktemp("install")
    source, wheels, target = root / "source", root / "wheels", root / "site"
    shutil.copytree(REPO, source, symlinks=True, ignore=NOT_SOURCE)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    built = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(source)],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (wheel,) = wheels.glob("launcher-*.whl")
    installed = subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)],
                               capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]
    for shipped in ("job.sbatch", "ds_configs/zero3.json", "stand-ins/llama-3.1-tokenizer/tokenizer.json",
                    "stand-ins/ultrachat_sample.jsonl"):
        path = target / "launcher" / "shipped" / shipped
        assert path.is_file() and not path.is_symlink(), f"{shipped} is not in the wheel as a file"
    return target


def run(site: Path, cwd: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """The venv's python with the installed wheel first on sys.path, in cwd (outside the checkout)."""
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def launcher(site: Path, cwd: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    result = run(site, cwd, "-m", "launcher", *args, timeout=timeout)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


@pytest.fixture
def outside(site, tmp_path) -> Path:
    """A working directory outside the checkout, where `import launcher` is the wheel's (not the editable install's,
    whose finder the venv also has)."""
    assert not tmp_path.resolve().is_relative_to(REPO)
    code = "import launcher, launcher.assets as a; print(launcher.__file__); print(a.shipped())"
    result = run(site, tmp_path, "-c", code)
    assert result.returncode == 0, result.stderr[-3000:]
    module, shipped = (Path(line).resolve() for line in result.stdout.split())
    if not module.is_relative_to(site.resolve()) or not shipped.is_relative_to(site.resolve()):
        pytest.fail(f"`import launcher` did not load the installed wheel in {site}: it loaded {module} (data "
                    f"{shipped}); the checkout's editable install wins, so this test would prove nothing")
    return tmp_path


def smoke_outside(cwd: Path) -> Path:
    """recipes/smoke.yaml and its model and data, copied to cwd; the recipe names its DeepSpeed config."""
    for part in ("model", "data"):
        shutil.copytree(REPO / "recipes" / "smoke" / part, cwd / part)
    raw = yaml.safe_load((REPO / "recipes" / "smoke.yaml").read_text())
    raw["model"]["name_or_path"] = "model"  # relative to the current directory, as a user's recipe would say
    raw["data"]["train"][0]["path"] = "data/train.jsonl"
    raw["data"]["eval"][0]["path"] = "data/heldout.jsonl"
    raw["deepspeed"]["config"] = "zero3"
    raw["run"]["output_dir"] = str(cwd / "run")
    (cwd / "recipe.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return cwd / "recipe.yaml"


def test_plan_and_submit_dry_run_from_the_wheel(site, outside):
    smoke_outside(outside)
    plan = launcher(site, outside, "plan", "recipe.yaml")
    zero3 = site / "launcher" / "shipped" / "ds_configs" / "zero3.json"
    assert f"stage 3 from {zero3}" in plan.stdout, plan.stdout
    submit = launcher(site, outside, "submit", "recipe.yaml", "--gpus_per_node", "1", "--dry_run")
    script = submit.stdout[submit.stdout.index("(dry run: nothing written, nothing submitted)"):]
    assert "#!/bin/bash" in script and "Written by `launcher submit`" in script and "{{" not in script, script
    assert "#SBATCH --gpus-per-node=1" in script and not (outside / "run").exists()


def test_unknown_config_name_lists_the_shipped_ones(site, outside):
    smoke_outside(outside)
    result = run(site, outside, "-m", "launcher", "plan", "recipe.yaml", "--deepspeed.config=zero9")
    assert result.returncode != 0
    assert "deepspeed.config 'zero9' is neither a shipped config (zero2, zero3, zero3_offload)" in result.stderr


def test_tiny_dry_run_from_the_wheel(site, outside):
    smoke_outside(outside)
    result = launcher(site, outside, "train", "recipe.yaml", "--dry_run", "--tiny", timeout=600)
    assert "--- dry run report" in result.stdout and "dry run passed" in result.stdout, result.stdout[-3000:]


def test_llama_recipe_tiny_dry_run_uses_the_packaged_stand_ins(site, outside):
    """The hub model and data are not here: --tiny takes the stand-in tokenizer from the wheel's package data; the
    data is a copy of the wheel's UltraChat sample."""
    shutil.copy(REPO / "recipes" / "llama-3.1-8b" / "config.json", outside / "config.json")
    shutil.copy(site / "launcher" / "shipped" / "stand-ins" / "ultrachat_sample.jsonl", outside / "sample.jsonl")
    raw = yaml.safe_load((REPO / "recipes" / "llama-3.1-8b" / "lora.yaml").read_text())
    assert raw["deepspeed"]["config"] == "zero3"
    raw["model"]["config"] = "config.json"
    raw["run"]["output_dir"] = str(outside / "run")
    (outside / "recipe.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    result = launcher(site, outside, "train", "recipe.yaml", "--dry_run", "--tiny", "--data.train.0.path=sample.jsonl",
                      "--data.eval.0.path=sample.jsonl", timeout=600)
    report = result.stdout[result.stdout.index("--- dry run report"):]
    assert "dry run passed" in report and "STAND-IN tokenizer llama-3.1-tokenizer" in report, report
