"""What the first cluster run meets before any GPU work: dependency floors the suite ran on, reentrant checkpointing
for LoRA under ZeRO-3, and DeepSpeed's first-use op builds (a directory per CPU type, no wait on a dead build)."""

from __future__ import annotations

import json
import os
import re
import time

from launcher import jit_ops
from launcher import recipe as recipes
from launcher.train import training_arguments
from tests.helpers import REPO, cli, smoke_recipe

SMOKE_MODEL = REPO / "recipes" / "smoke" / "model"


def test_dependency_floors_are_the_versions_the_suite_ran_on():
    """pyproject's floors equal constraints.txt's pins (and the Makefile's torch), which CI installs and tests."""
    text = (REPO / "pyproject.toml").read_text()
    deps = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M).group(1)
    floors = dict(re.findall(r'"([A-Za-z0-9_.-]+)>=([^"]+)"', deps))
    pins = {k.lower(): v for k, v in re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)$", (REPO / "constraints.txt").read_text(),
                                                 re.M)}
    pins["torch"] = re.search(r"^TORCH \?= torch==(\S+)", (REPO / "Makefile").read_text(), re.M).group(1)
    assert floors and {k.lower(): v for k, v in floors.items()} == {k.lower(): pins[k.lower()] for k in floors}


def test_lora_under_zero3_checkpoints_reentrantly():
    """TRL's own fix for this is written after TrainingArguments copied the kwargs, so the Trainer never saw it."""
    from trl import SFTConfig

    recipe = recipes.load(str(REPO / "recipes/llama-3.1-8b/lora.yaml"), {})
    assert recipe.lora and recipe.training.get("gradient_checkpointing")
    args = SFTConfig(output_dir="/tmp/unused", use_cpu=True, **training_arguments(recipe, 3))
    assert args.activation_checkpointing_kwargs["use_reentrant"] is True  # what Trainer passes to the model
    args = SFTConfig(output_dir="/tmp/unused", use_cpu=True, **training_arguments(recipe, 2))
    assert not (args.activation_checkpointing_kwargs or {}).get("use_reentrant")  # ZeRO-2: the default stays


def test_each_cpu_type_builds_its_ops_in_its_own_directory(tmp_path, monkeypatch):
    import torch.utils.cpp_extension

    a, b = jit_ops.extensions_dir(tmp_path, "flags: avx2"), jit_ops.extensions_dir(tmp_path, "flags: avx512f")
    assert a != b and a.parent == b.parent == tmp_path
    monkeypatch.setattr(torch.utils.cpp_extension, "get_default_build_root", lambda: str(tmp_path))
    env = {}
    jit_ops.prepare(env)
    assert env["TORCH_EXTENSIONS_DIR"] == str(jit_ops.extensions_dir(tmp_path, jit_ops.cpu_signature()))
    env = {"TORCH_EXTENSIONS_DIR": str(tmp_path / "mine")}
    jit_ops.prepare(env)
    assert env["TORCH_EXTENSIONS_DIR"] == str(tmp_path / "mine")  # the user's choice stands


def test_a_lock_left_by_a_killed_build_is_removed_and_a_live_one_kept(tmp_path, capsys):
    stale, live = tmp_path / "cpu_adam" / "lock", tmp_path / "py311_cpu" / "fused_adam" / "lock"
    for lock in (stale, live):
        lock.parent.mkdir(parents=True)
        lock.write_text("")
    old = time.time() - jit_ops.STALE_AFTER - 60
    os.utime(stale, (old, old))
    assert jit_ops.clear_stale_locks(tmp_path) == [stale]
    assert not stale.exists() and live.exists()
    assert f"removed {stale}" in capsys.readouterr().out


def fake_hub_cache(root, repo: str, files: list[str]) -> None:
    """huggingface_hub's cache layout: refs/main names a snapshot holding the files."""
    base = root / f"models--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text("abc123")
    snapshot = base / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    for name in files:
        shards = {"weight_map": {"a": "model-1.safetensors", "b": "model-2.safetensors"}}
        (snapshot / name).write_text(json.dumps(shards if name.endswith("index.json") else {}))


def test_weights_are_fetched_before_joining_unless_cached(tmp_path, monkeypatch):
    """A stand-in for the hub (none is reachable here): what is fetched, when, and what `launch` says about it."""
    import huggingface_hub
    import huggingface_hub.constants

    from launcher import weights

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.delenv("HF_HUB_OFFLINE")  # online: the ranks download what is missing (offline: the next test)
    fake_hub_cache(tmp_path, "org/full", ["config.json", "model.safetensors.index.json", "model-1.safetensors",
                                          "model-2.safetensors"])
    fake_hub_cache(tmp_path, "org/partial", ["config.json", "model.safetensors.index.json", "model-1.safetensors"])
    fetched = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda ref, **kw: fetched.append((ref, kw)))
    recipe = recipes.load(str(REPO / "recipes/llama-3.1-8b/lora.yaml"), {})
    for ref, cached in (("org/full", True), ("org/partial", False), ("org/absent", False)):
        recipe.model.name_or_path = ref
        assert weights.cached(ref) is cached
        assert ("is not in this host's" in weights.describe(recipe)) is not cached
        weights.fetch(recipe)
    assert [ref for ref, _ in fetched] == ["org/partial", "org/absent"]
    assert "*.safetensors" in fetched[0][1]["allow_patterns"] and "*.bin" not in fetched[0][1]["allow_patterns"]
    recipe.model.name_or_path = str(REPO / "recipes/smoke/model")
    assert weights.describe(recipe) is None  # a local model: nothing to fetch


def test_offline_launch_refuses_uncached_weights_before_any_rank_starts(tmp_path):
    """HF_HUB_OFFLINE (set for every test) and a hub model this host's cache lacks: one line, exit 2, no rank."""
    recipe = smoke_recipe(tmp_path, model={"name_or_path": "org/not-downloaded", "tokenizer": str(SMOKE_MODEL),
                                           "config": str(SMOKE_MODEL / "config.json")})
    result = cli("launch", recipe, "--nproc_per_node", 2, env={"HF_HOME": str(tmp_path / "hf")})
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "model.name_or_path org/not-downloaded: not in this host's Hugging Face cache" in result.stderr
    assert "hf download org/not-downloaded" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "ranks").exists() and "weights:" not in result.stdout


def test_the_worker_fetches_the_weights_before_it_joins_the_process_group(tmp_path, monkeypatch, capsys):
    """A fetch that fails (offline, not cached) stops the rank before build, which joins the process group."""
    import pytest

    from launcher import train, weights
    from launcher.errors import RecipeError
    from tests.helpers import smoke_recipe

    def offline(recipe):
        raise RecipeError("model.name_or_path org/x: not in this host's Hugging Face cache")

    monkeypatch.setattr(weights, "fetch", offline)
    monkeypatch.setattr(train, "build", lambda *a, **k: pytest.fail("build (which joins the group) ran first"))
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "29999"}.items():  # one rank of one
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit) as stopped:
        train.run(str(smoke_recipe(tmp_path)), {})
    assert stopped.value.code == 2
    assert "not in this host's Hugging Face cache" in capsys.readouterr().err
