"""What the first GPU run would hit, caught on CPU (issue 14, items 1-3): a missing flash-attn or bitsandbytes is
refused before launch (simulated by hiding the package from importlib), QLoRA computes in the training precision,
and the default precision follows the device (simulated by its compute capability)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import subprocess

import pytest

from launcher import dry_run, ds_config, modeling, preflight
from launcher import recipe as recipes
from launcher.errors import RecipeError
from tests.helpers import smoke_recipe


@pytest.fixture
def packages(monkeypatch):
    """packages({"flash_attn": ("flash-attn", "2.7.4")}): a stand-in environment where only the named top-level
    modules beyond the real ones are installed, each from (distribution, version); HIDDEN ones are missing."""
    real_spec, real_version = importlib.util.find_spec, importlib.metadata.version
    hidden = {"flash_attn", "flash_attn_interface", "kernels", "bitsandbytes"}

    def install(fake: dict):
        dists = dict(fake.values())

        def find_spec(name, *args, **kwargs):
            if name in fake:
                return real_spec("json")  # any spec: the check must not import the module
            return None if name in hidden else real_spec(name, *args, **kwargs)

        def version(dist):
            if dist in dists:
                return dists[dist]
            if dist in {"flash-attn", "flash-attn-3", "flash-attn-4", "kernels", "bitsandbytes"}:
                raise importlib.metadata.PackageNotFoundError(dist)
            return real_version(dist)

        monkeypatch.setattr(importlib.util, "find_spec", find_spec)
        monkeypatch.setattr(importlib.metadata, "version", version)

    return install


def load(tmp_path, **sections):
    return recipes.load(str(smoke_recipe(tmp_path, **sections)))


def resolve(recipe):  # as the gate does, on 2 ranks
    return ds_config.resolve(recipe, 2, recipes.model_config(recipe, "r.yaml"), "r.yaml")


# --- item 1: flash-attn ---------------------------------------------------------------------------------------------

def test_missing_flash_attn_is_refused_before_launch(tmp_path, packages):
    packages({})
    recipe = load(tmp_path, model={"attn_implementation": "flash_attention_2"})
    with pytest.raises(RecipeError) as err:
        preflight.check(recipe, "r.yaml")  # what launch and submit run through the gate
    message = str(err.value)
    assert message.startswith("r.yaml: model.attn_implementation flash_attention_2 needs flash-attn 2.3.3 or newer")
    assert "pip install flash-attn --no-build-isolation" in message and "attn_implementation: sdpa" in message
    assert "\n" not in message


@pytest.mark.parametrize(("impl", "fake", "ok"), [
    ("flash_attention_2", {"flash_attn": ("flash-attn", "2.7.4")}, True),
    ("flash_attention_2", {"flash_attn": ("flash-attn", "2.1.0")}, False),  # transformers needs 2.3.3
    ("flash_attention_2", {"flash_attn": ("flash-attn-4", "4.0.0")}, False),  # FA4 ships the same module name
    ("flash_attention_3", {"flash_attn_interface": ("flash-attn-3", "3.0.0b1")}, True),
    ("flash_attention_3", {"flash_attn": ("flash-attn", "2.7.4")}, False),
    ("sdpa", {}, True),
])
def test_the_attention_backend_needs_its_own_package(tmp_path, packages, impl, fake, ok):
    packages(fake)
    recipe = load(tmp_path, model={"attn_implementation": impl})
    if ok:
        preflight.check_packages(recipe, "r.yaml")
    else:
        with pytest.raises(RecipeError, match="model.attn_implementation"):
            preflight.check_packages(recipe, "r.yaml")


def test_the_hub_kernel_route_must_be_cached_when_offline(tmp_path, packages, monkeypatch):
    """flash-attn missing but `kernels` installed: transformers fetches kernels-community/flash-attn2 on every rank."""
    packages({"kernels": ("kernels", "0.18.5")})
    monkeypatch.setenv("KERNELS_CACHE", str(tmp_path / "kernels"))
    recipe = load(tmp_path, model={"attn_implementation": "flash_attention_2"})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RecipeError, match="kernels-community/flash-attn2.*not in the cache.*HF_HUB_OFFLINE"):
        preflight.check_packages(recipe, "r.yaml")
    (tmp_path / "kernels" / "models--kernels-community--flash-attn2" / "snapshots" / "abc").mkdir(parents=True)
    preflight.check_packages(recipe, "r.yaml")  # cached: the ranks load it offline
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    (tmp_path / "kernels" / "models--kernels-community--flash-attn2" / "snapshots" / "abc").rmdir()
    preflight.check_packages(recipe, "r.yaml")  # online: the ranks fetch it
    packages({"kernels": ("kernels", "0.19.1")})  # outside the range transformers accepts: it ignores kernels
    with pytest.raises(RecipeError, match="needs flash-attn"):
        preflight.check_packages(recipe, "r.yaml")


def test_the_cpu_dry_run_reports_what_its_fallbacks_hide(tmp_path, packages):
    packages({})
    recipe = load(tmp_path, model={"attn_implementation": "flash_attention_2"}, lora={"quantize": "4bit"})
    changes = dry_run.cpu_fallbacks(recipe, "r.yaml")
    assert any("launch and submit refuse it" in c and "needs flash-attn" in c for c in changes), changes
    assert recipe.model.attn_implementation == "sdpa" and recipe.lora.quantize == "none"


# --- item 2: bitsandbytes, QLoRA's compute dtype --------------------------------------------------------------------

def test_missing_bitsandbytes_is_refused_before_launch(tmp_path, packages):
    packages({})
    recipe = load(tmp_path, lora={"quantize": "4bit"})
    with pytest.raises(RecipeError) as err:
        preflight.check(recipe, "r.yaml")
    assert str(err.value).startswith("r.yaml: lora.quantize 4bit (QLoRA) needs bitsandbytes")
    assert "pip install bitsandbytes" in str(err.value)
    packages({"bitsandbytes": ("bitsandbytes", "0.48.0")})
    preflight.check_packages(recipe, "r.yaml")


@pytest.mark.parametrize(("training", "dtype"), [({"fp16": True}, "float16"), ({"bf16": True}, "bfloat16"),
                                                 ({"bf16": False}, "float32")])
def test_qlora_computes_in_the_training_precision(tmp_path, training, dtype):
    import torch

    recipe = load(tmp_path, lora={"quantize": "4bit"}, training=training)
    resolve(recipe)  # as the gate does before the model is loaded
    assert modeling.quantization_config(recipe).bnb_4bit_compute_dtype == getattr(torch, dtype)


# --- item 3: precision ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("bf16", "fp16", "capability", "expected"), [
    (None, False, (9, 0), (True, False)),  # H100
    (None, False, (8, 0), (True, False)),  # A100
    (None, False, (7, 5), (False, True)),  # T4
    (None, False, (7, 0), (False, True)),  # V100
    (None, False, None, (True, False)),  # no GPU seen: CPU (as before) or a login node; the ranks decide then
    (None, True, (9, 0), (False, True)),
    (False, False, (7, 0), (False, False)),
    (True, False, None, (True, False)),
])
def test_the_default_precision_follows_the_device(bf16, fp16, capability, expected):
    assert ds_config.precision(bf16, fp16, capability) == expected


def test_unset_precision_resolves_to_fp16_on_a_v100(tmp_path, monkeypatch):
    monkeypatch.setattr(ds_config, "device_capability", lambda: (7, 0))
    recipe = load(tmp_path, drop=("training.bf16",))
    ds, _ = resolve(recipe)
    assert (ds["bf16"]["enabled"], ds["fp16"]["enabled"]) == (False, True)
    assert (recipe.training["bf16"], recipe.training["fp16"]) == (False, True)  # SFTConfig gets the same answer


def test_bf16_on_a_gpu_without_it_is_refused_in_one_line(tmp_path, monkeypatch):
    """On a rank (or a launch where the GPUs are visible), before anything is loaded."""
    monkeypatch.setattr(ds_config, "device_capability", lambda: (7, 5))
    recipe = load(tmp_path, training={"bf16": True})
    with pytest.raises(RecipeError) as err:
        resolve(recipe)
    assert str(err.value).startswith("r.yaml: training.bf16 is true") and "set training.fp16: true" in str(err.value)
    assert "compute capability 7.5" in str(err.value)


@pytest.mark.parametrize("training", [{"bf16": True, "bf16_full_eval": True}, {"bf16": False, "fp16": True,
                                                                                "fp16_full_eval": True}])
def test_full_eval_is_in_the_resolved_deepspeed_precision(tmp_path, monkeypatch, training):
    monkeypatch.setattr(ds_config, "device_capability", lambda: None)
    recipe = load(tmp_path, training=training)
    ds, _ = resolve(recipe)
    t = recipe.training
    for key in ("bf16", "fp16"):  # the comparison of transformers' HfTrainerDeepSpeedConfig.trainer_config_process
        assert ds[key]["enabled"] == bool(t.get(key) or t.get(f"{key}_full_eval"))


def test_device_capability_asks_nvidia_smi_for_the_visible_devices(monkeypatch):
    calls = []

    def run(command, **kwargs):
        calls.append(command)
        return subprocess.CompletedProcess(command, 0, stdout="8.0\n7.5\n", stderr="")

    monkeypatch.setattr(ds_config.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    monkeypatch.setattr(ds_config.subprocess, "run", run)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert ds_config.device_capability() == (7, 5) and calls[-1][-2:] == ["-i", "2,3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert ds_config.device_capability() is None
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr(ds_config.shutil, "which", lambda name: None)
    assert ds_config.device_capability() is None


def test_submit_preflight_checks_the_packages_its_cpu_dry_run_swaps_out(tmp_path):
    """`submit --preflight` runs the dry run, which uses sdpa on this CPU: the real job's flash-attn is checked
    first, in the real environment (flash-attn is not installed here)."""
    import importlib.util

    from tests.helpers import assert_rejected, cli

    assert importlib.util.find_spec("flash_attn") is None and importlib.util.find_spec("kernels") is None
    result = cli("submit", smoke_recipe(tmp_path), "--preflight", "--tiny", "--gpus_per_node", 1,
                 "--model.attn_implementation=flash_attention_2", "--training.bf16=true")
    assert_rejected(result, "model.attn_implementation flash_attention_2 needs flash-attn")
    assert "PASS" not in result.stdout  # refused before minutes of dry run
