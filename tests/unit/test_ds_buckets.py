"""ZeRO bucket sizes and the persistence threshold a template leaves "auto": the larger of DeepSpeed's default and HF's
formula (launcher/ds_config.py bucket_size), written as numbers into the resolved config; a number given is kept."""

from __future__ import annotations

import json

import pytest

from launcher import ds_config
from tests.helpers import REPO, cli

KEYS = ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold")
DEEPSPEED = {"reduce_bucket_size": 500_000_000, "stage3_prefetch_bucket_size": 50_000_000,
             "stage3_param_persistence_threshold": 100_000}  # DeepSpeedZeroConfig's defaults, from its source

# By hand: HF's formulas are h*h, 0.9*h*h and 10*h; the rule takes the larger of each and DeepSpeed's default.
# smoke, h 128:   16,384 / 14,745 / 1,280                  -> 5e8 / 5e7 / 1e5 (DeepSpeed's defaults)
# 8B, h 4096:     16,777,216 / 15,099,494 / 40,960          -> 5e8 / 5e7 / 1e5
# 70B, h 8192:    67,108,864 / 60,397,977.6 / 81,920        -> 5e8 / 60,397,977 / 1e5
EXPECTED = {
    "smoke": (REPO / "recipes/smoke/model/config.json", 128, (500_000_000, 50_000_000, 100_000)),
    "8b": (REPO / "recipes/llama-3.1-8b/config.json", 4096, (500_000_000, 50_000_000, 100_000)),
    "70b": (REPO / "recipes/llama-3.1-70b/config.json", 8192, (500_000_000, 60_397_977, 100_000)),
}


def zero3() -> dict:
    return ds_config.load_template(str(REPO / "ds_configs" / "zero3.json"))


def test_the_defaults_are_deepspeeds():
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    fields = DeepSpeedZeroConfig.model_fields
    by_alias = {(f.alias or name): f.default for name, f in fields.items()}
    assert {k: by_alias[k] for k in KEYS} == DEEPSPEED == ds_config.DEEPSPEED_DEFAULTS


@pytest.mark.parametrize("model", EXPECTED)
def test_auto_resolves_by_the_rule(model):
    path, hidden, expected = EXPECTED[model]
    config = json.loads(path.read_text())
    assert config["hidden_size"] == hidden
    ds = zero3()
    ds_config._set_buckets(ds, config, "zero3.json")
    assert tuple(ds["zero_optimization"][k] for k in KEYS) == expected
    assert all(isinstance(ds["zero_optimization"][k], int) for k in KEYS)


def test_wider_models_keep_hfs_growth():
    # 405B-wide (h 16384): 268,435,456 / 241,591,910.4 / 163,840 against 5e8 / 5e7 / 1e5
    assert [ds_config.bucket_size(k, 16384) for k in KEYS] == [500_000_000, 241_591_910, 163_840]
    # above sqrt(5e8) = 22360.7 HF's reduce bucket is the larger too
    assert ds_config.bucket_size("reduce_bucket_size", 22361) == 22361 * 22361


def test_hidden_size_of_a_multimodal_or_encoder_decoder_config():
    assert ds_config.bucket_size("stage3_prefetch_bucket_size",
                                 ds_config.hidden_size({"text_config": {"hidden_size": 8192}})) == 60_397_977
    assert ds_config.hidden_size({"d_model": 1024}) == 1024


def test_without_a_model_config_deepspeeds_defaults():
    ds = zero3()
    ds_config._set_buckets(ds, None, "zero3.json")
    assert {k: ds["zero_optimization"][k] for k in KEYS} == DEEPSPEED


def test_zero2_fills_its_reduce_bucket_only():
    ds = ds_config.load_template(str(REPO / "ds_configs" / "zero2.json"))
    ds_config._set_buckets(ds, {"hidden_size": 8192}, "zero2.json")
    zero = ds["zero_optimization"]
    assert zero["reduce_bucket_size"] == 500_000_000 and "stage3_prefetch_bucket_size" not in zero


def test_a_given_number_is_kept():
    ds = zero3()
    ds["zero_optimization"].update(reduce_bucket_size=50_000_000, stage3_param_persistence_threshold=0)
    ds_config._set_buckets(ds, {"hidden_size": 8192}, "zero3.json")
    zero = ds["zero_optimization"]
    assert (zero["reduce_bucket_size"], zero["stage3_prefetch_bucket_size"],
            zero["stage3_param_persistence_threshold"]) == (50_000_000, 60_397_977, 0)


@pytest.mark.parametrize(("recipe", "model", "args"), [
    ("recipes/smoke.yaml", "smoke", ["--nproc_per_node", "2"]),
    ("recipes/llama-3.1-8b/full.yaml", "8b", ["--nproc_per_node", "8"]),
    ("recipes/llama-3.1-70b/lora.yaml", "70b", ["--nproc_per_node", "8", "--nnodes", "4"]),
])
def test_plan_shows_the_numbers(recipe, model, args):
    result = cli("plan", recipe, *args, "--format", "json")
    assert result.returncode == 0, result.stderr
    zero = json.loads(result.stdout)["deepspeed"]["zero_optimization"]
    assert tuple(zero[k] for k in KEYS) == EXPECTED[model][2]


def test_a_recipes_override_is_kept(recipe_factory):
    recipe = recipe_factory(deepspeed={"config": "zero3", "overrides": {"zero_optimization": {
        "reduce_bucket_size": 1234, "stage3_prefetch_bucket_size": 5678}}})
    result = cli("plan", recipe, "--nproc_per_node", "2", "--format", "json")
    assert result.returncode == 0, result.stderr
    zero = json.loads(result.stdout)["deepspeed"]["zero_optimization"]
    assert (zero["reduce_bucket_size"], zero["stage3_prefetch_bucket_size"],
            zero["stage3_param_persistence_threshold"]) == (1234, 5678, 100_000)
