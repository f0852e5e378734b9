"""Read a recipe: YAML file + command-line overrides -> a validated, resolved `Recipe`. No heavy imports here."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import yaml

from launcher import schema, sft_fields
from launcher.errors import RecipeError
from launcher.schema import Recipe

DATA_SUFFIXES = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
TOP_LEVEL = frozenset(f.name for f in dataclasses.fields(Recipe))


def is_override(key: str) -> bool:
    """A command-line key that sets the recipe: dotted (--training.learning_rate) or a top-level key (--task)."""
    return "." in key or key in TOP_LEVEL


def load(path: str, overrides: dict[str, Any] | None = None) -> Recipe:
    """Parse, override, validate and resolve paths. Raises RecipeError naming the file and key."""
    raw = read_yaml(path)
    where = path
    if overrides:
        apply_overrides(raw, overrides, path)
        where = f"{path} (with overrides {', '.join('--' + k for k in overrides)})"
    training = schema.training_args(raw.pop("training", None), where)
    recipe = schema.build(Recipe, {**raw, "training": {}}, where)
    recipe.training = training
    check_combinations(recipe, where)
    return resolve_paths(recipe, where)


def read_yaml(path: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        raw = yaml.safe_load(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise RecipeError(f"{path}: not UTF-8 text (byte {err.start})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise RecipeError(f"{path}:{line} YAML syntax error: {getattr(err, 'problem', err)}") from None
    if raw is None:
        raise RecipeError(f"{path}: recipe is empty; see recipes/smoke.yaml for the expected sections")
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of sections (run, model, data, training, ...)")
    return raw


def apply_overrides(raw: dict, overrides: dict[str, Any], path: str) -> None:
    """Set dotted keys (`training.learning_rate`, `data.train.0.path`) in the parsed YAML, in place."""
    for dotted, value in overrides.items():
        keys = str(dotted).split(".")
        node = raw
        for i, key in enumerate(keys[:-1]):
            node = _child(node, key, ".".join(keys[: i + 1]), path)
        last = keys[-1]
        if isinstance(node, list):
            node[_index(node, last, dotted, path)] = value
        else:
            node[last] = value


def _child(node: Any, key: str, dotted: str, path: str) -> Any:
    if isinstance(node, list):
        return node[_index(node, key, dotted, path)]
    if not isinstance(node, dict):
        raise RecipeError(f"{path}: override --{dotted}: '{dotted.rsplit('.', 1)[0]}' is not a section")
    if node.get(key) is None:
        node[key] = {}
    return node[key]


def _index(node: list, key: str, dotted: str, path: str) -> int:
    if not key.isdigit() or int(key) >= len(node):
        raise RecipeError(f"{path}: override --{dotted}: '{key}' is not an index of a {len(node)}-item list")
    return int(key)


def check_combinations(recipe: Recipe, where: str) -> None:
    check_task(recipe, where)
    if recipe.training.get("bf16") and recipe.training.get("fp16"):
        schema.fail(where, "training.bf16", "and training.fp16 are both true; pick one")
    if not recipe.data.train:
        schema.fail(where, "data.train", "needs at least one dataset")
    if recipe.lora and recipe.model.init == "random":
        schema.fail(where, "model.init", "is random, but LoRA adapts a pretrained model: a random base could not be "
                    "merged with the adapter later; use init: pretrained")
    report_to = recipe.training.get("report_to") or []
    if "wandb" in ([report_to] if isinstance(report_to, str) else report_to):
        schema.fail(where, "training.report_to", "includes wandb; W&B is set up by the wandb section (one run per "
                    "job, resumed with the job): remove it from report_to")
    if recipe.training.get("eval_strategy", "no") != "no" and not recipe.data.eval and not recipe.data.eval_fraction:
        schema.fail(where, "training.eval_strategy", "asks for evaluation but there is no data.eval and "
                    "data.eval_fraction is 0")


# SFT options that mean the same for a classification head: the token budget of one example.
SHARED_WITH_SFT = {"max_length"}


def check_task(recipe: Recipe, where: str) -> None:
    """What each task needs from the head, freeze and training sections."""
    head, task = recipe.head, recipe.task
    if task == "sft":
        if head.labels or head.class_weights is not None:
            schema.fail(where, "head", "is for task classification or regression; this recipe's task is sft")
    else:
        for key in recipe.training:
            if key in sft_fields.sft_only() and key not in SHARED_WITH_SFT:
                schema.fail(where, f"training.{key}", f"is an SFT option; task {task} trains with the HF Trainer, "
                            "which ignores it: remove it")
        if recipe.lora:
            schema.fail(where, "lora", f"is not supported with task {task} yet; fine-tune the head with freeze "
                        "instead")
    if task == "classification":
        if len(head.labels) < 2:
            schema.fail(where, "head.labels", "must name at least two labels for task classification, in id "
                        "order: [negative, positive]")
        if len(set(head.labels)) != len(head.labels):
            schema.fail(where, "head.labels", f"has a label twice: {head.labels}")
        weights = head.class_weights
        if isinstance(weights, list) and (len(weights) != len(head.labels) or min(weights) <= 0):
            schema.fail(where, "head.class_weights", f"must be {len(head.labels)} positive numbers (one per label "
                        "in head.labels), or balanced")
    if task == "regression" and (head.labels or head.class_weights is not None):
        schema.fail(where, "head", "labels and class_weights are for classification; regression predicts one number")
    if recipe.freeze and recipe.lora:
        schema.fail(where, "freeze", "and lora both choose what trains: LoRA already freezes the base model; "
                    "remove one")


def resolve_paths(recipe: Recipe, where: str) -> Recipe:
    """Make local paths absolute (the resolved recipe is run from elsewhere) and check that they exist."""
    m = recipe.model
    m.name_or_path = _model_ref(m.name_or_path, where, "model.name_or_path")
    if m.tokenizer:
        m.tokenizer = _model_ref(m.tokenizer, where, "model.tokenizer")
    if m.config:
        m.config = _existing(m.config, where, "model.config")
    if m.init == "random" and not config_path(recipe):
        schema.fail(where, "model.init", "is random, which needs a local config (model.config or a local model dir)")
    for section in ("train", "eval"):
        for i, spec in enumerate(getattr(recipe.data, section)):
            spec.path = _data_ref(spec.path, where, f"data.{section}.{i}.path")
    recipe.deepspeed.config = _existing(recipe.deepspeed.config, where, "deepspeed.config")
    recipe.run.output_dir = str(Path(recipe.run.output_dir or f"runs/{recipe.run.name}").absolute())
    if recipe.run.resume not in ("auto", "never"):
        recipe.run.resume = str(_existing_dir(recipe.run.resume, where, "run.resume"))
    return recipe


def config_path(recipe: Recipe) -> str | None:
    """The local config.json of the model, if there is one (for plan's estimate without weights)."""
    if recipe.model.config:
        return recipe.model.config
    local = Path(recipe.model.name_or_path) / "config.json"
    return str(local) if local.is_file() else None


def model_config(recipe: Recipe, where: str) -> dict | None:
    path = config_path(recipe)
    if path is None:
        return None
    try:
        return json.loads(Path(path).read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise RecipeError(f"{where}: model config {path} is not valid JSON ({err})") from None


def _looks_local(ref: str) -> bool:
    return ref.startswith((".", "/", "~")) or ref.count("/") != 1


def _model_ref(ref: str, where: str, key: str) -> str:
    if Path(ref).expanduser().exists():
        return str(Path(ref).expanduser().absolute())
    if _looks_local(ref):
        schema.fail(where, key, f"'{ref}' does not exist (neither a local directory nor an org/name hub id)")
    return ref  # a hub id: checked when it is downloaded


def _data_ref(ref: str, where: str, key: str) -> str:
    local = Path(ref).expanduser()
    if local.exists():
        if local.is_file() and local.suffix not in DATA_SUFFIXES:
            schema.fail(where, key, f"'{ref}' has an unsupported type; use one of {', '.join(DATA_SUFFIXES)}")
        return str(local.absolute())
    if local.suffix in DATA_SUFFIXES or _looks_local(ref):
        schema.fail(where, key, f"'{ref}' does not exist")
    return ref


def _existing(ref: str, where: str, key: str) -> str:
    path = Path(ref).expanduser()
    if not path.is_file():
        schema.fail(where, key, f"'{ref}' does not exist")
    return str(path.absolute())


def _existing_dir(ref: str, where: str, key: str) -> str:
    path = Path(ref).expanduser()
    if not path.is_dir():
        schema.fail(where, key, f"'{ref}' is neither auto, never, nor an existing checkpoint directory")
    return str(path.absolute())


def to_dict(recipe: Recipe) -> dict[str, Any]:
    return dataclasses.asdict(recipe)


def dump(recipe: Recipe) -> str:
    """The resolved recipe as YAML, every launcher default written out (training: only keys set or derived)."""
    return yaml.safe_dump(to_dict(recipe), sort_keys=False, default_flow_style=False)
