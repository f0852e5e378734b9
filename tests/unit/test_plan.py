"""`plan`: every shipped recipe and ZeRO config resolves offline, the arithmetic holds, nothing heavy is imported."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from tests.helpers import REPO, cli

RECIPES = sorted(REPO.glob("recipes/**/*.yaml"))
DS_CONFIGS = sorted(REPO.glob("ds_configs/**/*.json"))


def plan_json(*args) -> dict:
    result = cli("plan", *args, "--format", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def find_auto(node, path=""):
    if node == "auto":
        return [path]
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in find_auto(v, f"{path}.{k}")]
    return []


def test_shipped_files_exist():
    assert len(RECIPES) >= 4 and len(DS_CONFIGS) >= 3


# The CPU demos' global batch of 32 fits up to 2 ranks of 16; the GPU recipes are made for 8 GPUs a node.
CPU_DEMOS = ("smoke.yaml", "sentiment.yaml", "ner.yaml", "qa.yaml")
PLANS = [(r, n) for r in RECIPES for n in ((1, 2) if r.name in CPU_DEMOS else (1, 8))]


@pytest.mark.parametrize(("recipe", "gpus"), PLANS, ids=[f"{r.relative_to(REPO)}-{n}" for r, n in PLANS])
def test_every_shipped_recipe_plans_offline(recipe, gpus):
    plan = plan_json(recipe.relative_to(REPO), "--nproc_per_node", gpus)
    ds = plan["deepspeed"]
    assert find_auto(ds) == []
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * gpus
    assert "per device" in plan["memory"]


@pytest.mark.parametrize("ds_config", DS_CONFIGS, ids=[p.name for p in DS_CONFIGS])
def test_every_shipped_ds_config_plans(recipe_factory, ds_config):
    overrides = {"zero_optimization": {"stage3_gather_16bit_weights_on_model_save": True}}
    plan = plan_json(recipe_factory(deepspeed={"config": str(ds_config), "overrides": overrides},
                                    lora={"r": 4}), "--nproc_per_node", 2)
    assert find_auto(plan["deepspeed"]) == []
    if "optimizer" in plan["deepspeed"]:
        assert plan["deepspeed"]["optimizer"]["params"]["lr"] == plan["recipe"]["training"]["learning_rate"]


@pytest.mark.parametrize("world", [1, 2, 4])
def test_fixed_global_batch_derives_accumulation(recipe_factory, world):
    plan = plan_json(recipe_factory(run={"global_batch_size": 64}), "--nproc_per_node", world)
    assert plan["batch"] == {"micro": 16, "accumulation": 64 // (16 * world), "world": world, "global": 64}
    assert plan["recipe"]["training"]["gradient_accumulation_steps"] == 64 // (16 * world)


def test_accumulation_without_global_batch(recipe_factory):
    recipe = recipe_factory(drop=("run.global_batch_size",),
                            training={"per_device_train_batch_size": 4, "gradient_accumulation_steps": 3})
    plan = plan_json(recipe, "--nnodes", 3, "--nproc_per_node", 2)
    assert plan["batch"]["global"] == 4 * 3 * 6 == plan["deepspeed"]["train_batch_size"]


def test_command_line_beats_recipe(recipe_factory):
    plan = plan_json(recipe_factory(), "--training.learning_rate=1e-5", "--lora.r=8",
                     "--deepspeed.overrides.zero_optimization.stage3_gather_16bit_weights_on_model_save=True")
    assert plan["recipe"]["training"]["learning_rate"] == 1e-5
    assert plan["recipe"]["lora"]["r"] == 8


def test_multi_node_command_without_ssh(recipe_factory):
    plan = plan_json(recipe_factory(), "--nnodes", 2, "--nproc_per_node", 1, "--node_rank", 1,
                     "--master_addr", "10.1.2.3", "--master_port", 29999)
    cmd = plan["command"]
    assert cmd[cmd.index("--node_rank") + 1] == "1" and "--no_ssh" in cmd
    assert cmd[cmd.index("--master_addr") + 1] == "10.1.2.3"
    assert cmd[cmd.index("--hostfile") + 1].endswith("hostfile")
    assert plan["deepspeed"]["train_batch_size"] == 32 and plan["batch"]["world"] == 2


def test_text_plan_shows_everything(recipe_factory):
    result = cli("plan", recipe_factory(), "--nproc_per_node", 2)
    assert result.returncode == 0, result.stderr
    for needle in ("topology", "world size 2", "global 32", "memory", "deepspeed", "--module launcher.train",
                   "ds_config.json", "recipe.yaml", '"train_batch_size": 32'):
        assert needle in result.stdout


LIGHT = """
import sys
sys.argv = {argv!r}
from launcher.cli import main
try:
    main()
except SystemExit:
    pass
heavy = sorted({{'torch', 'transformers', 'deepspeed', 'trl', 'peft', 'datasets'}} & set(sys.modules))
print('HEAVY', heavy)
"""


@pytest.mark.parametrize("argv", [["launcher", "--help"], ["launcher", "plan", "recipes/smoke.yaml"],
                                  ["launcher", "plan", "recipes/llama-3.1-70b/lora.yaml"]])
def test_help_and_plan_import_no_heavy_library(argv):
    result = subprocess.run([sys.executable, "-c", LIGHT.format(argv=argv)], cwd=REPO, capture_output=True,
                            text=True, env={"PAGER": "cat", "PATH": "/usr/bin:/bin"})
    assert "HEAVY []" in result.stdout, result.stdout[-2000:] + result.stderr[-2000:]


GPU_RECIPES = {"recipes/llama-3.1-70b/lora.yaml": (4, 8), "recipes/llama-3.1-8b/full.yaml": (2, 8),
               "recipes/llama-3.1-8b/lora.yaml": (1, 8)}  # the topology each recipe's first line runs it on


@pytest.mark.parametrize("recipe", GPU_RECIPES)
def test_gpu_recipes_fit_80gb_gpus_without_offload_and_evaluate_on_a_slice(recipe):
    """What a practitioner would defend: no offload where the sharded model fits (offload moves every layer over
    PCIe each step), an eval set that costs minutes not hours, tokenization in parallel."""
    nodes, per_node = GPU_RECIPES[recipe]
    plan = plan_json(REPO / recipe, "--nnodes", nodes, "--nproc_per_node", per_node)
    zero = plan["deepspeed"]["zero_optimization"]
    assert "offload_param" not in zero and "offload_optimizer" not in zero
    gib = [float(re.search(r"([\d.]+) GiB per device", plan[key]).group(1)) for key in ("memory", "activations")]
    assert sum(gib) < 0.9 * 80 * 10**9 / 2**30, gib  # headroom for the allocator and communication buffers
    data, training = plan["recipe"]["data"], plan["recipe"]["training"]
    assert all(spec["weight"] < 1 for spec in data["eval"]) and training["dataset_num_proc"] > 1
