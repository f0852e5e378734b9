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
    apply_overrides(raw, overrides or {}, path)
    where = f"{path} (with overrides {', '.join('--' + k for k in overrides)})" if overrides else path
    return resolve_paths(schema.build(Recipe, raw, where), where)


def apply_overrides(raw: dict, overrides: dict[str, Any], path: str) -> None:
    """Set dotted keys (`training.learning_rate`, `data.train.0.path`) in the parsed YAML, in place."""
    for dotted, value in overrides.items():
        keys = str(dotted).split(".")
        node = raw
        for i, key in enumerate(keys, 1):
            here = ".".join(keys[:i])
            if isinstance(node, list):
                if not key.isdigit() or int(key) >= len(node):
                    raise RecipeError(f"{path}: override --{here}: '{key}' is not an index of a {len(node)}-item list")
                key = int(key)
            elif not isinstance(node, dict):
                raise RecipeError(f"{path}: override --{here}: '{here.rsplit('.', 1)[0]}' is not a section")
            elif i < len(keys) and node.get(key) is None:
                node[key] = {}
            if i == len(keys):
                node[key] = value
            node = node[key]


def resolve_paths(recipe: Recipe, where: str) -> Recipe:
    """Make local paths absolute (the resolved recipe is run from elsewhere) and check that they exist."""
    m = recipe.model
    m.name_or_path = _local_or_hub(m.name_or_path, where, "model.name_or_path")
    if m.tokenizer:
        m.tokenizer = _local_or_hub(m.tokenizer, where, "model.tokenizer")
    if m.config:
        m.config = _existing(m.config, where, "model.config")
    if m.init == "random" and not config_path(recipe):
        schema.fail(where, "model.init", "is random, which needs a local config (model.config or a local model dir)")
    for section in ("train", "eval"):
        for i, spec in enumerate(getattr(recipe.data, section)):
            spec.path = _local_or_hub(spec.path, where, f"data.{section}.{i}.path", data=True)
    recipe.deepspeed.config = _existing(assets.ds_config(recipe.deepspeed.config, where), where, "deepspeed.config")
    recipe.run.output_dir = str(Path(recipe.run.output_dir or f"runs/{recipe.run.name}").absolute())
    if recipe.run.resume not in ("auto", "never"):
        recipe.run.resume = _existing(recipe.run.resume, where, "run.resume", Path.is_dir,
                                      "is neither auto, never, nor an existing checkpoint directory")
    return recipe


def config_path(recipe: Recipe) -> str | None:
    """The local config.json of the model, if there is one (for plan's estimate without weights)."""
    if recipe.model.config:
        return recipe.model.config
    local = Path(recipe.model.name_or_path) / "config.json"
    return str(local) if local.is_file() else None


def model_config(recipe: Recipe, where: str) -> dict | None:
    if (path := config_path(recipe)) is None:
        return None
    try:
        return json.loads(Path(path).read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise RecipeError(f"{where}: model config {path} is not valid JSON ({err})") from None


def _local_or_hub(ref: str, where: str, key: str, data: bool = False) -> str:
    """A local path, made absolute, or a hub id (org/name, checked when it is downloaded)."""
    local = Path(ref).expanduser()
    if data and local.is_file() and local.suffix not in DATA_SUFFIXES:
        schema.fail(where, key, f"'{ref}' has an unsupported type; use one of {', '.join(DATA_SUFFIXES)}")
    hub = ref.count("/") == 1 and not ref.startswith((".", "/", "~")) and not (data and local.suffix in DATA_SUFFIXES)
    if hub and not local.exists():
        return ref
    problem = "does not exist" if data else "does not exist (neither a local directory nor an org/name hub id)"
    return _existing(ref, where, key, Path.exists, problem)


def _existing(ref: str, where: str, key: str, exists=Path.is_file, problem: str = "does not exist") -> str:
    path = Path(ref).expanduser()
    if not exists(path):
        schema.fail(where, key, f"'{ref}' {problem}")
    return str(path.absolute())


def to_dict(recipe: Recipe) -> dict[str, Any]:
    return dataclasses.asdict(recipe)


def dump(recipe: Recipe) -> str:
    """The resolved recipe as YAML, every launcher default written out (training: only keys set or derived)."""
    return yaml.safe_dump(to_dict(recipe), sort_keys=False, default_flow_style=False)
