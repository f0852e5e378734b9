"""Datasets for SFT: local files or hub ids, renamed to TRL's column names, checked row by row, mixed by weight."""

from __future__ import annotations

from pathlib import Path

from launcher.errors import RecipeError
from launcher.recipe import DATA_SUFFIXES
from launcher.schema import DatasetSpec, Recipe

# TRL's dataset formats, by the columns that identify them (first match wins).
FORMATS = {"messages": ("messages",), "prompt_completion": ("prompt", "completion"), "text": ("text",)}
ROLES = {"system", "user", "assistant", "tool"}


def load(recipe: Recipe, where: str, seed: int):
    """(train, eval or None) as `datasets.Dataset`s in one TRL format."""
    train = _mix([_load_one(s, where, f"data.train.{i}", seed) for i, s in enumerate(recipe.data.train)], where)
    if recipe.data.eval:
        eval_sets = [_load_one(s, where, f"data.eval.{i}", seed) for i, s in enumerate(recipe.data.eval)]
        return train, _mix(eval_sets, where)
    if recipe.data.eval_fraction > 0:
        split = train.train_test_split(test_size=recipe.data.eval_fraction, seed=seed)
        return split["train"], split["test"]
    return train, None


def _load_one(spec: DatasetSpec, where: str, key: str, seed: int):
    import datasets

    local = Path(spec.path)
    try:
        if local.is_file():
            ds = datasets.load_dataset(DATA_SUFFIXES[local.suffix], data_files=str(local), split="train")
        else:
            ds = datasets.load_dataset(spec.path, spec.subset, split=spec.split)
    except Exception as err:  # datasets raises many types; the user needs the file and the first line of why
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RecipeError(f"{where}: {key} '{spec.path}' could not be read: {reason}") from None
    ds = _rename(ds, spec, where, key)
    fmt = detect_format(ds.column_names, where, key, spec.path)
    ds = ds.select_columns(list(FORMATS[fmt]))
    check_rows(ds, fmt, spec.path)
    return _weighted(ds, spec.weight, seed)


def _rename(ds, spec: DatasetSpec, where: str, key: str):
    for target, source in spec.columns.items():
        if source not in ds.column_names:
            raise RecipeError(f"{where}: {key}.columns maps '{target}' to '{source}', but {spec.path} has only "
                              f"columns {ds.column_names}")
        if source != target:
            if target in ds.column_names:
                ds = ds.remove_columns(target)
            ds = ds.rename_column(source, target)
    return ds


def detect_format(columns: list[str], where: str, key: str, path: str) -> str:
    for fmt, needed in FORMATS.items():
        if all(c in columns for c in needed):
            return fmt
    raise RecipeError(f"{path}: columns {columns} match no format (messages, prompt+completion or text); "
                      f"map yours with {key}.columns in {where}")


def check_rows(ds, fmt: str, path: str) -> None:
    """Fail on the first malformed row, by its 1-based row number, before any rank trains on it."""
    for number, row in enumerate(ds, 1):
        problem = _row_problem(row, fmt)
        if problem:
            raise RecipeError(f"{path}: row {number}: {problem}")


def _row_problem(row: dict, fmt: str) -> str | None:
    if fmt == "text":
        return None if isinstance(row["text"], str) and row["text"] else "'text' is empty or not a string"
    if fmt == "prompt_completion":
        for column in ("prompt", "completion"):
            value = row[column]
            if value is None or (isinstance(value, str) and not value):
                return f"'{column}' is empty"
        return None
    messages = row["messages"]
    if not messages:
        return "'messages' is an empty conversation"
    for turn in messages:
        if not isinstance(turn, dict) or turn.get("role") not in ROLES or not isinstance(turn.get("content"), str):
            return f"each message needs a role in {sorted(ROLES)} and a string content, got {turn!r}"[:300]
    if not any(turn["role"] == "assistant" for turn in messages):
        return "no assistant message: nothing to learn from this conversation"
    return None


def _weighted(ds, weight: float, seed: int):
    """Repeat whole copies, then take a seeded sample for the fractional part."""
    import datasets

    whole, part = int(weight), weight - int(weight)
    pieces = [ds] * whole
    if part > 0:
        pieces.append(ds.shuffle(seed=seed).select(range(round(len(ds) * part))))
    return datasets.concatenate_datasets(pieces) if len(pieces) > 1 else pieces[0]


def _mix(sets: list, where: str):
    import datasets

    if len(sets) == 1:
        return sets[0]
    columns = {tuple(sorted(s.column_names)) for s in sets}
    if len(columns) > 1:
        raise RecipeError(f"{where}: data sets to mix have different formats ({sorted(columns)}); use one format")
    return datasets.concatenate_datasets(sets)
