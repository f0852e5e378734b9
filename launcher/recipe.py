"""Read a recipe: YAML file + command-line overrides -> a validated, resolved `Recipe`. No heavy imports here."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import yaml

from launcher import assets, schema
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
    return resolve_paths(schema.build(Recipe, raw, where), where)


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
    recipe.deepspeed.config = _existing(assets.ds_config(recipe.deepspeed.config, where), where, "deepspeed.config")
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
