"""`plan`: everything a launch would do, resolved and printed, with nothing started and no weights loaded."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from launcher import ds_config, memory, rules
from launcher import recipe as recipes
from launcher.ds_config import Batch
from launcher.errors import RecipeError
from launcher.schema import Recipe
from launcher.topology import ENV_FILE, Topology, deepspeed_command, forwarded, rank_env, shell_line


@dataclass
class Plan:
    recipe_path: str
    recipe: Recipe
    topology: Topology
    ds_config: dict
    batch: Batch
    env: dict[str, str]
    command: list[str]
    memory: str  # one line: per-device model states, or why there is no estimate
    params: int | None
    trainable: tuple[int, int] | None = None  # (trainable, total) when a freeze or a task head decides them
    activations: str = "no estimate"  # one line: per-device activations of one micro batch

    @property
    def run_dir(self) -> Path:
        return Path(self.recipe.run.output_dir)

    def snapshot(self) -> dict[str, str]:
        """The resolved recipe and DeepSpeed config, as every start writes them into the run directory."""
        return {"recipe.yaml": recipes.dump(self.recipe), "ds_config.json": ds_config.to_json(self.ds_config)}

    def files(self) -> dict[str, str]:
        """What the launch writes into the run directory before starting ranks (content by file name)."""
        out = self.snapshot()
        if self.topology.node_rank == 0:  # one record of the command, not one per node overwriting each other
            out["command.txt"] = shell_line(self.env, self.command) + "\n"
        if self.topology.nnodes > 1 and not self.topology.hostfile:  # DeepSpeed's no-ssh mode still needs one
            out["hostfile"] = "".join(f"node{i} slots={n}\n" for i, n in enumerate(self.topology.slots))
        if self.topology.hostfile:
            out[ENV_FILE] = "".join(f"{k}={v}\n" for k, v in forwarded({**os.environ, **self.env})[0].items())
        return out


def make(recipe_path: str, overrides: dict[str, Any], topology) -> Plan:
    """The recipe loaded, every rule checked and the DeepSpeed config resolved for `topology`: a Topology, a
    function of the recipe giving one, or None for the Slurm job's ranks (the recipe's slurm section)."""
    recipe = recipes.load(recipe_path, overrides)
    if callable(topology):
        topology = topology(recipe)
    elif topology is None:
        if (per_node := recipe.slurm.gpus_per_node) is None:
            raise RecipeError(f"{recipe_path}: slurm.gpus_per_node is not set; pass --gpus_per_node (ranks per node)")
        topology = Topology((per_node,) * recipe.slurm.nodes)
    config = recipes.model_config(recipe, recipe_path)
    ds, batch = ds_config.resolve(recipe, topology.world, config, recipe_path)
    rules.check(recipe, ds, ds_config.zero_stage(ds, ""), config, recipe_path, ds_config.template_label(recipe))
    run_dir = Path(recipe.run.output_dir)
    hostfile = str(run_dir / "hostfile") if topology.nnodes > 1 and not topology.hostfile else None
    command = deepspeed_command(topology, [str(run_dir / "recipe.yaml")], hostfile)
    # (trainable, total) of the task's model, frozen on the meta device: freeze rules matching nothing fail here,
    # before any launch. Skipped when nothing is frozen and the model is a plain causal LM (no transformers import).
    trainable = count = None
    if config is not None and (recipe.freeze is not None or recipe.task != "sft"):
        from launcher import freeze, modeling

        model = modeling.meta_model(recipe)
        trainable, count = freeze.apply(model, recipe.freeze, recipe_path), memory.count_model(model)
    params, estimate, activations = memory_line(recipe, config, ds, topology, count)
    env = rank_env(topology, run_dir)
    return Plan(recipe_path, recipe, topology, ds, batch, env, command, estimate, params, trainable, activations)


def memory_line(recipe: Recipe, config: dict | None, ds: dict, topology: Topology,
                count: memory.ParamCount | None) -> tuple[int | None, str, str]:
    """(parameters, the model-states line, the activations line)."""
    if config is None:
        return None, "no estimate: set model.config to a local config.json to get one", "no estimate"
    try:
        count = count or memory.count_params(config)
    except memory.UnknownArchitecture:
        count = memory.count_params_meta(recipes.config_path(recipe))
    stage = ds_config.zero_stage(ds, recipe.deepspeed.config)
    off_opt, off_param = ds_config.offload(ds)
    nodes, per_node, lora = topology.nnodes, topology.slots[0], recipe.lora
    half = ds.get("bf16", {}).get("enabled") is True or ds.get("fp16", {}).get("enabled") is True
    where = ", ".join(w for w, on in (("optimizer", off_opt), ("parameters", off_param)) if on)
    what = f"of {count.total / 1e6:,.1f} M params at ZeRO-{stage}" + (f", {where} offloaded" if where else "")
    try:
        if lora is None:
            device, cpu = memory.model_states_bytes(count, stage, nodes, per_node, off_opt, off_param)
        else:  # a frozen base and trainable adapters; needs the exact layout
            adapters = memory.lora_params(config, lora.r, lora.target_modules, lora.modules_to_save)
            dtype_bytes = base_dtype_bytes(recipe, config, stage, half)
            base = memory.frozen_base_bytes(config, dtype_bytes, lora.quantize)
            device, cpu = memory.lora_states_bytes(count, base, adapters, stage, nodes, per_node, off_opt, off_param)
            kind = lora.quantize.replace("bit", "-bit") if lora.quantize != "none" else f"{8 * dtype_bytes}-bit"
            what += f": a frozen {kind} base and {adapters.total / 1e6:,.1f} M trainable adapter params"
        activations = activations_line(recipe, config, half, bool(lora and lora.dropout))
    except memory.UnknownArchitecture as err:  # LoRA on an architecture without a layout: no honest figure
        return count.total, f"no estimate for LoRA: {err}", "no estimate"
    line = (f"{memory.format_bytes(device)} per device and {memory.format_bytes(cpu)} CPU per node for model states "
            + what)
    return count.total, line, activations


def base_dtype_bytes(recipe: Recipe, config: dict, stage: int, half: bool) -> int:
    """Bytes per frozen weight: ZeRO-3's zero.Init casts to the training precision; otherwise the loaded dtype
    (auto: the checkpoint's, from config.json)."""
    if stage == 3:
        return 2 if half else 4
    dtype = recipe.model.dtype if recipe.model.dtype != "auto" else config.get("torch_dtype", config.get("dtype"))
    return 2 if dtype in ("bfloat16", "float16") else 4


def activations_line(recipe: Recipe, config: dict, half: bool, dropout: bool) -> str:
    if recipe.task != "sft":
        return "no estimate for a task head"
    t = lambda key: ds_config.training_value(recipe, key)  # noqa: E731
    micro, seq, checkpointing = t("per_device_train_batch_size"), t("max_length"), bool(t("gradient_checkpointing"))
    targets = recipe.lora.target_modules if recipe.lora and dropout else ()
    if targets == "all-linear":
        targets = tuple(memory.linear_module_names(config) - {"lm_head"})
    n = memory.activation_bytes(config, micro, seq, checkpointing, 2 if half else 4, tuple(targets),
                                recipe.model.attn_implementation == "eager")
    return (f"{memory.format_bytes(n)} per device for micro batch {micro} x {seq} tokens"
            f"{', gradient checkpointing' if checkpointing else ''}, logits included "
            + ("(packed: every batch)" if t("packing") else "(the longest batch; shorter rows need less)"))


def fine_tune(plan: Plan) -> str:
    if plan.recipe.lora:
        return f"LoRA r={plan.recipe.lora.r} on {plan.recipe.lora.target_modules}"
    if plan.trainable is None:
        return "full"
    from launcher import freeze

    rules = plan.recipe.freeze
    what = "full" if rules is None else "frozen: " + ", ".join(
        [*(["embeddings"] if rules.embeddings or rules.all_but_last is not None else []),
         *([f"all layers but the last {rules.all_but_last}"] if rules.all_but_last is not None else []),
         *rules.patterns])
    return f"{what}; {freeze.describe(*plan.trainable)}"


def render(plan: Plan) -> str:
    rows = {"recipe": plan.recipe_path, "run dir": str(plan.run_dir), "topology": str(plan.topology),
            "batch": str(plan.batch),
            "zero": f"stage {ds_config.zero_stage(plan.ds_config, '')} from {plan.recipe.deepspeed.config}",
            "task": plan.recipe.task + (f" {plan.recipe.head.labels}" if plan.recipe.head.labels else ""),
            "fine-tune": fine_tune(plan), "memory": plan.memory, "activations": plan.activations,
            "command": shell_line(plan.env, plan.command)}
    width = max(map(len, rows))
    lines = [f"{k:<{width}}  {v}" for k, v in rows.items()]
    for name, text in plan.files().items():
        if name != "command.txt":
            lines += ["", f"--- {plan.run_dir / name}", text.rstrip()]
    return "\n".join(lines)


def as_json(plan: Plan) -> dict[str, Any]:
    return {"recipe": recipes.to_dict(plan.recipe), "deepspeed": plan.ds_config,
            "batch": {**asdict(plan.batch), "global": plan.batch.global_size},
            "topology": {"nnodes": plan.topology.nnodes, "slots": list(plan.topology.slots)},
            "env": plan.env, "command": plan.command, "memory": plan.memory, "activations": plan.activations,
            "params": plan.params,
            "trainable_params": plan.trainable[0] if plan.trainable else None, "run_dir": str(plan.run_dir)}
