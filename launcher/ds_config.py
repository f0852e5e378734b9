"""Turn a DeepSpeed JSON template + the recipe + the world size into the exact config every rank uses.

Nothing is left as "auto": the batch arithmetic (global = micro x accumulation x world), precision, clipping,
optimizer hyper-parameters and bucket sizes are written as numbers here, so `plan` shows what the ranks will run.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher import sft_fields
from launcher.errors import RecipeError
from launcher.schema import Recipe, fail


@dataclass(frozen=True)
class Batch:
    micro: int
    accumulation: int
    world: int

    @property
    def global_size(self) -> int:
        return self.micro * self.accumulation * self.world

    def __str__(self) -> str:
        return f"micro {self.micro} x accumulation {self.accumulation} x world {self.world} = global {self.global_size}"


def training_value(recipe: Recipe, key: str) -> Any:
    return recipe.training.get(key, sft_fields.fields()[key].default)


def resolve(recipe: Recipe, world: int, model_config: dict | None, where: str) -> tuple[dict, Batch]:
    """The resolved DeepSpeed config and batch. Writes the derived batch numbers into recipe.training."""
    ds = merge(load_template(recipe.deepspeed.config), recipe.deepspeed.overrides)
    label = template_label(recipe)
    zero_stage(ds, label)
    batch = resolve_batch(recipe, world, where)
    recipe.training.update(per_device_train_batch_size=batch.micro, gradient_accumulation_steps=batch.accumulation)
    numbers = {"train_micro_batch_size_per_gpu": batch.micro, "gradient_accumulation_steps": batch.accumulation,
               "train_batch_size": batch.global_size, "gradient_clipping": training_value(recipe, "max_grad_norm")}
    for key, value in numbers.items():
        current = ds.get(key, "auto")  # fill an "auto" or absent key; a number already there must agree
        if current != "auto" and current != value:
            raise RecipeError(f"{label}: {key} is {current!r} but the recipe gives {value!r}; set it to \"auto\"")
        ds[key] = value
    _set_precision(ds, recipe, where)
    _set_optimizer(ds, recipe)
    _set_buckets(ds, model_config, label)
    _no_auto_left(ds, label)
    return ds, batch


def template_label(recipe: Recipe) -> str:
    return recipe.deepspeed.config + (" (with deepspeed.overrides)" if recipe.deepspeed.overrides else "")


def to_json(ds: dict) -> str:
    """The one serialisation used for the run directory and `plan`, so the two compare equal."""
    return json.dumps(ds, indent=2) + "\n"


def load_template(path: str) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise RecipeError(f"{path}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from None
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not UTF-8 text") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a DeepSpeed config is a JSON object")
    return data


def merge(base: dict, overrides: dict) -> dict:
    """Deep-merge `overrides` into a copy of `base`; nested mappings merge, everything else replaces."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = merge(out[key], value) if both else copy.deepcopy(value)
    return out


def zero_stage(ds: dict, label: str) -> int:
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3) or isinstance(stage, bool):
        raise RecipeError(f"{label}: zero_optimization.stage is {stage!r}; ZeRO stages are 0, 1, 2 and 3")
    return stage


def resolve_batch(recipe: Recipe, world: int, where: str) -> Batch:
    micro = training_value(recipe, "per_device_train_batch_size")
    if (wanted := recipe.run.global_batch_size) is None:
        return Batch(micro, training_value(recipe, "gradient_accumulation_steps"), world)
    if wanted % (micro * world):
        raise RecipeError(f"{where}: run.global_batch_size {wanted} is not divisible by micro batch {micro} x world "
                          f"size {world} = {micro * world}; change one of them")
    accumulation = wanted // (micro * world)
    if (given := recipe.training.get("gradient_accumulation_steps")) is not None and given != accumulation:
        raise RecipeError(f"{where}: training.gradient_accumulation_steps {given} contradicts run.global_batch_size "
                          f"{wanted} at world size {world} (needs {accumulation}); set only one of them")
    return Batch(micro, accumulation, world)


def _set_precision(ds: dict, recipe: Recipe, where: str) -> None:
    """Resolve bf16/fp16 once, write the answer into recipe.training too (SFTConfig then agrees with DeepSpeed and
    TRL's own default, bf16 whenever fp16 is off, never applies) and into the config."""
    t = recipe.training
    bf16, fp16 = precision(t.get("bf16"), bool(t.get("fp16")), capability := device_capability())
    if bf16 and capability is not None and capability < BF16_CAPABILITY:  # the rank's one line, before any load
        fail(where, "training.bf16", f"is true (set, or the default of a launch from a host without GPUs), but "
             f"this host's GPUs have compute capability {capability[0]}.{capability[1]} and bf16 needs 8.0 (A100, "
             "H100 or newer): set training.fp16: true")
    t.update(bf16=bf16, fp16=fp16)
    for key, enabled in (("bf16", bf16), ("fp16", fp16)):
        # HF compares <key>.enabled with training.<key> or <key>_full_eval (trainer_config_process); rules.py
        # refuses a full_eval whose precision is off, as the engine evaluates in the precision it trains in
        enabled = enabled or bool(t.get(f"{key}_full_eval"))
        section = ds.setdefault(key, {})
        if section.get("enabled", "auto") not in ("auto", enabled):
            raise RecipeError(f"{recipe.deepspeed.config}: {key}.enabled contradicts training.{key}; set \"auto\"")
        section["enabled"] = enabled


def precision(bf16: bool | None, fp16: bool, capability: tuple[int, int] | None) -> tuple[bool, bool]:
    """(bf16, fp16) for training. capability: the lowest CUDA compute capability among the devices this process
    sees, or None where it sees none. An unset bf16 (with fp16 off) is bf16 on devices that have it (8.0, Ampere,
    and newer), fp16 on older GPUs (V100, T4), and bf16 where no GPU is seen: a CPU run (as before), or a login node
    planning a GPU job (the ranks see the devices: their gate refuses bf16 on GPUs without it, in one line)."""
    if bf16 is None:
        bf16 = not fp16 and (capability is None or capability >= BF16_CAPABILITY)
        fp16 = fp16 or not bf16
    return bool(bf16), bool(fp16)


BF16_CAPABILITY = (8, 0)


def device_capability() -> tuple[int, int] | None:
    """The lowest compute capability of the CUDA devices this process may use, or None when it sees none. Asked of
    nvidia-smi rather than torch: `plan` imports no heavy library (and no GPU, no nvidia-smi: None)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return None
    if (smi := shutil.which("nvidia-smi")) is None:
        return None
    command = [smi, "--query-gpu=compute_cap", "--format=csv,noheader", *(["-i", visible] if visible else [])]
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=30, check=True).stdout
        return min(tuple(int(x) for x in line.strip().split(".")) for line in out.splitlines() if line.strip())
    except (OSError, ValueError, subprocess.SubprocessError):  # an old driver without compute_cap, MIG ids, ...
        return None


def _set_optimizer(ds: dict, recipe: Recipe) -> None:
    if "optimizer" not in ds:  # the trainer's own AdamW runs inside DeepSpeed; HF sets this flag for it
        ds["zero_allow_untested_optimizer"] = True
        return
    params = ds["optimizer"].get("params", {})
    values = {"lr": training_value(recipe, "learning_rate"), "eps": training_value(recipe, "adam_epsilon"),
              "betas": [training_value(recipe, "adam_beta1"), training_value(recipe, "adam_beta2")],
              "weight_decay": training_value(recipe, "weight_decay")}
    for key, value in values.items():
        if params.get(key) == "auto":
            params[key] = value


# DeepSpeed's own defaults (deepspeed/runtime/zero/config.py, DeepSpeedZeroConfig) for the keys a template leaves
# "auto", and HF's "auto" formulas (transformers.integrations.deepspeed, HfTrainerDeepSpeedConfig), by hidden size h.
DEEPSPEED_DEFAULTS = {"reduce_bucket_size": 500_000_000, "stage3_prefetch_bucket_size": 50_000_000,
                      "stage3_param_persistence_threshold": 100_000}
HF_FORMULAS = {"reduce_bucket_size": lambda h: h * h, "stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
               "stage3_param_persistence_threshold": lambda h: 10 * h}


def bucket_size(key: str, hidden: int | None) -> int:
    """An "auto" bucket size or persistence threshold: the larger of DeepSpeed's default and HF's formula.

    Not HF's formulas alone: sized for large models, they make tiny collectives on small ones. The smoke recipe
    (hidden 128, ZeRO-3, 2 CPU ranks, 150 steps, quiet machine) trained in 24.8 s with them (reduce bucket 16384,
    prefetch 14745, persistence 1280: dozens of collectives of a few KB a step) and in 16.5 s with DeepSpeed's
    defaults (every matrix of it has < 1e5 elements, so stays whole on each rank, and a step's gradients go in one
    reduce-scatter); a plain TRL script with DeepSpeed's defaults took 18.0 s. bench/train_speed.py measures it.

    Not below DeepSpeed's defaults for large models either (reasoned, not measured here: no GPUs): they are what
    DeepSpeed tunes and tests, and larger buckets only mean fewer collectives; at 100 MB-1 GB a message the transfer
    is bandwidth-bound, so fewer cost no more (the one price: the last reduce bucket of a backward overlaps less with
    compute). HF's growth is kept where it exceeds them. Resolved: Llama 3.1 8B (h 4096) 5e8 / 5e7 / 1e5, DeepSpeed's
    defaults (HF's formulas: 16.8M / 15.1M / 40960); 70B (h 8192) 5e8 / 60,397,977 (HF's) / 1e5; a 405B-wide model
    (h 16384) 5e8 / 241,591,910 / 163,840.

    Memory per GPU, allocated at engine start and not in `plan`'s estimate of model states: ZeRO-3 holds one
    gradient bucket of reduce_bucket_size elements in the communication dtype (stage3.py, contiguous_gradients), 1 GB
    in bf16 (2 GB fp32); ZeRO-2 with overlap_comm two. HF's formula gave 34 MB (8B) and 134 MB (70B) in bf16, so this
    rule leaves ~1 GB (ZeRO-2: ~2 GB) less for activations; where that is short, give a number (e.g. 5e7) in
    deepspeed.overrides. Prefetch gathers up to that many parameter elements ahead of use: 100 MB (8B) / 121 MB (70B)
    in bf16. The persistence threshold keeps parameters smaller than it whole on every rank: in an 8B or 70B Llama the
    norms and LoRA matrices (r x h); in a model whose matrices are all smaller (hidden up to ~158 with a 4x MLP, as
    the smoke model), the whole model, replicated as in plain data parallelism: that is where its speed comes from."""
    floor = DEEPSPEED_DEFAULTS[key]
    return floor if hidden is None else max(floor, HF_FORMULAS[key](hidden))


def hidden_size(config: dict | None) -> int | None:
    config = config or {}
    return config.get("hidden_size") or (config.get("text_config") or {}).get("hidden_size") or config.get("d_model")


def _set_buckets(ds: dict, model_config: dict | None, label: str) -> None:
    """Fill the "auto" bucket sizes with bucket_size(); a number the template or the recipe gives is kept. Without the
    model's config (a hub model not on this machine, no model.config) DeepSpeed's defaults apply, as DeepSpeed would
    use them: HF's formulas only raise the prefetch bucket from hidden size 7454 and the threshold above 10000."""
    zero, hidden = ds.get("zero_optimization", {}), hidden_size(model_config)
    for key in DEEPSPEED_DEFAULTS:
        if zero.get(key) == "auto":
            zero[key] = bucket_size(key, hidden)


def _no_auto_left(ds: Any, label: str, path: str = "") -> None:
    if ds == "auto":
        raise RecipeError(f"{label}: {path} is \"auto\" and the launcher cannot derive it; give a number")
    if isinstance(ds, dict):
        for key, value in ds.items():
            _no_auto_left(value, label, f"{path}.{key}" if path else key)


def offload(ds: dict) -> tuple[bool, bool]:
    """(optimizer offloaded, parameters offloaded) to CPU or NVMe."""
    zero = ds.get("zero_optimization", {})
    return tuple(zero.get(f"offload_{what}", {}).get("device", "none") != "none" for what in ("optimizer", "param"))
