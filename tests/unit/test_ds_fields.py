"""DeepSpeed's keys, read from its source, are exactly the ones it knows; `plan` refuses any other, naming it."""

from __future__ import annotations

import importlib
import subprocess
import sys
import types
import typing

import pytest

from launcher import ds_config, ds_fields
from launcher import recipe as recipes
from launcher.errors import RecipeError
from tests.helpers import REPO, assert_rejected, cli

TEMPLATES = sorted(REPO.glob("launcher/shipped/ds_configs/*.json"))
RECIPES = sorted(REPO.glob("recipes/**/*.yaml"))


def model_keys(cls) -> dict:
    """What pydantic accepts: every field by name and by alias, nested models likewise."""
    from deepspeed.runtime.config_utils import DeepSpeedConfigModel

    def nested(annotation):
        if isinstance(annotation, type) and issubclass(annotation, DeepSpeedConfigModel):
            return model_keys(annotation)
        if typing.get_origin(annotation) in (typing.Union, types.UnionType):
            return next((k for k in map(nested, typing.get_args(annotation)) if k is not None), None)
        return None

    out = {}
    for name, field in cls.model_fields.items():
        out[name] = nested(field.annotation)
        if field.alias:
            out[field.alias] = out[name]
    return out


@pytest.mark.parametrize("section", sorted(ds_fields.MODELS))
def test_sections_match_deepspeeds_models(section):
    module, cls = ds_fields.MODELS[section]
    model = getattr(importlib.import_module("deepspeed." + module.removesuffix(".py").replace("/", ".")), cls)
    assert ds_fields.keys()[section] == model_keys(model)


class Tracked(dict):
    """A dict that records the keys looked up in it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = set()

    def __getitem__(self, key):
        self.seen.add(key)
        return super().__getitem__(key)

    def get(self, key, *default):
        self.seen.add(key)
        return super().get(key, *default)

    def __contains__(self, key):
        self.seen.add(key)
        return super().__contains__(key)

    def keys(self):  # `key in d.keys()` counts too
        return self

    def __copy__(self):  # DeepSpeedConfig reads a copy
        return self


def test_keys_match_what_deepspeedconfig_reads(monkeypatch):
    from deepspeed import comm
    from deepspeed.runtime import config

    monkeypatch.setattr(comm, "get_rank", lambda: 0)  # as on a rank: the world-size branch reads its key too
    monkeypatch.setattr(comm, "get_world_size", lambda *args: 1)
    seen, sections = set(), {}
    for zero in ({}, True):  # True: the legacy boolean form, which reads allgather_size at the top level
        top = Tracked(train_batch_size=1, train_micro_batch_size_per_gpu=1, zero_optimization=zero,
                      optimizer=Tracked(type="AdamW", params={}), scheduler=Tracked(type="WarmupLR", params={}),
                      activation_checkpointing=Tracked(), flops_profiler=Tracked())
        config.DeepSpeedConfig(top)
        seen |= top.seen
        sections = {key: value.seen for key, value in top.items() if isinstance(value, Tracked)}
    known = ds_fields.keys()
    # data_parallel_size is read by deepspeed.initialize, before DeepSpeedConfig; removed keys raise there
    assert set(known) == seen - set(config._REMOVED_TOP_LEVEL_CONFIG_KEYS) | {"data_parallel_size"}
    for key, read in sections.items():
        assert set(known[key]) == read, key
    assert set(ds_fields.MODELS) | set(ds_fields.READERS) <= set(known)


@pytest.mark.parametrize("section", sorted(ds_fields.MODELS))
def test_deepspeed_refuses_an_unknown_key_in_each_modelled_section(section):
    from deepspeed.runtime.config import DeepSpeedConfig

    with pytest.raises(Exception, match="bogus_key"):
        DeepSpeedConfig({"train_batch_size": 1, section: {"bogus_key": 1}})


def refusal(ds: dict, overrides: dict) -> str:
    with pytest.raises(RecipeError) as err:
        ds_fields.check(ds, overrides, "r.yaml", "zero3.json")
    return str(err.value)


def test_misspelt_key_one_level_down_names_the_override_and_the_key_meant():
    overrides = {"zero_optimization": {"stage3_max_live_paramters": 1000}}
    assert refusal(ds_config.merge({"zero_optimization": {"stage": 3}}, overrides), overrides) == (
        "r.yaml: deepspeed.overrides.zero_optimization.stage3_max_live_paramters is not a DeepSpeed key "
        "(did you mean 'stage3_max_live_parameters'?)")


def test_misspelt_key_two_levels_down():
    overrides = {"zero_optimization": {"offload_optimizer": {"devce": "cpu"}}}
    assert "deepspeed.overrides.zero_optimization.offload_optimizer.devce is not a DeepSpeed key (did you mean " \
           "'device'?)" in refusal(overrides, overrides)


def test_misspelt_top_level_key_which_deepspeed_would_ignore():
    assert refusal({"gradient_acumulation_steps": 4}, {"gradient_acumulation_steps": 4}) == (
        "r.yaml: deepspeed.overrides.gradient_acumulation_steps is not a DeepSpeed key "
        "(did you mean 'gradient_accumulation_steps'?)")


def test_a_template_key_is_named_in_the_template():
    assert refusal({"bf16": {"enable": True}}, {}).startswith(
        "zero3.json: bf16.enable is not a DeepSpeed key (did you mean 'enabled'?)")


def test_optimizer_params_and_auto_values_pass():
    zero = {"reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto", "prefetch_bucket_size": 1,
            "cpu_offload": False}  # an alias, its field name and a deprecated field
    ds_fields.check({"optimizer": {"type": "AdamW", "params": {"lr": "auto", "torch_adam": True, "anything": 1}},
                     "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": "auto"}},
                     "zero_optimization": zero, "train_batch_size": "auto"}, {}, "r.yaml", "t")
    assert "optimizer.parms" in refusal({"optimizer": {"type": "AdamW", "parms": {}}}, {})


@pytest.mark.parametrize("template", TEMPLATES, ids=[p.name for p in TEMPLATES])
def test_every_shipped_template_passes(template):
    ds_fields.check(ds_config.load_template(str(template)), {}, "r.yaml", template.name)


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(REPO)) for p in RECIPES])
def test_every_shipped_recipe_passes(path, monkeypatch):
    monkeypatch.chdir(REPO)
    recipe = recipes.load(str(path.relative_to(REPO)))
    ds = ds_config.merge(ds_config.load_template(recipe.deepspeed.config), recipe.deepspeed.overrides)
    ds_fields.check(ds, recipe.deepspeed.overrides, str(path), ds_config.template_label(recipe))


def test_shipped_files_found():
    assert len(TEMPLATES) >= 3 and len(RECIPES) >= 4


def test_plan_refuses_a_misspelt_override():
    assert_rejected(cli("plan", "recipes/smoke.yaml", "--deepspeed.overrides.zero_optimization."
                        "stage3_max_live_paramters=1000"),
                    "recipes/smoke.yaml: deepspeed.overrides.zero_optimization.stage3_max_live_paramters is not a "
                    "DeepSpeed key (did you mean 'stage3_max_live_parameters'?)")


def test_reading_the_keys_imports_no_deepspeed():
    code = ("import sys, time; from launcher import ds_fields; t = time.perf_counter(); ds_fields.keys(); "
            "print(time.perf_counter() - t, sorted({'torch', 'deepspeed', 'pydantic'} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    seconds, heavy = result.stdout.split(" ", 1)
    assert heavy.strip() == "[]" and float(seconds) < 2, result.stdout  # ~50 ms; importing deepspeed takes ~3 s
