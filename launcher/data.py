"""Datasets for SFT: local files or hub ids, renamed to TRL's column names, checked row by row, mixed by weight."""

from __future__ import annotations

import json
from pathlib import Path

from launcher import head_rows
from launcher.errors import RecipeError
from launcher.recipe import DATA_SUFFIXES
from launcher.schema import DatasetSpec, Recipe

# TRL's dataset formats, by the columns that identify them (first match wins).
FORMATS = {"messages": ("messages",), "prompt_completion": ("prompt", "completion"), "text": ("text",)}
# The head tasks' formats, by their columns (first match wins), and each task's formats
HEAD_FORMATS = {"classification": ("text", "label"), "regression": ("text", "label"), "tags": ("tokens", "tags"),
                "spans": ("text", "spans"), "squad": ("question", "context", "answers")}
TASK_FORMATS = {"classification": ("classification",), "regression": ("regression",),
                "token_classification": ("tags", "spans"), "question_answering": ("squad",)}
ROLES = {"system", "user", "assistant", "tool"}


def load(recipe: Recipe, where: str, seed: int, local_only: bool = False, loaded: list | None = None):
    """(train, eval or None) as `datasets.Dataset`s in one TRL format. local_only: leave out hub datasets (they
    cannot be checked offline); an emptied section is None. loaded: gets (key, path, dataset) for each one read."""
    import datasets

    def section(name: str):
        items = []
        for i, spec in enumerate(getattr(recipe.data, name)):
            if local_only and not is_local(spec):
                continue
            key = f"data.{name}.{i}"
            ds = load_one(spec, where, key, recipe.task, recipe.head.labels)
            if loaded is not None:
                loaded.append((key, spec.path, ds))
            part = spec.weight - int(spec.weight)  # whole copies, then a seeded sample for the fractional part
            pieces = [ds] * int(spec.weight) + ([ds.shuffle(seed=seed).select(range(round(len(ds) * part)))]
                                                if part > 0 else [])
            items.append((key, datasets.concatenate_datasets(pieces) if len(pieces) > 1 else pieces[0]))
        if len(items) < 2:
            return items[0][1] if items else None
        # mixed: one format, and the same column types (datasets cannot align others)
        formats = {key: "+".join(sorted(ds.column_names)) for key, ds in items}
        if len(set(formats.values())) > 1:
            listed = ", ".join(f"{key} is {fmt}" for key, fmt in formats.items())
            raise RecipeError(f"{where}: data sets to mix have different formats ({listed}); use one format")
        try:
            return datasets.concatenate_datasets([ds for _, ds in items])
        except ValueError:  # datasets' message prints whole feature types; name the column and the datasets instead
            (first, base), *rest = items
            other, column = next(((key, c) for key, ds in rest for c in base.column_names
                                  if ds.features[c] != base.features[c]), (rest[0][0], base.column_names[0]))
            raise RecipeError(f"{where}: {first} and {other} cannot be mixed: their '{column}' values are built "
                              "differently (keys that some rows or messages have and others lack, or other types); "
                              "give every row the same keys") from None

    train = section("train")
    if recipe.data.eval:
        return train, section("eval")
    if recipe.data.eval_fraction > 0 and train is not None:
        split = train.train_test_split(test_size=recipe.data.eval_fraction, seed=seed)
        return split["train"], split["test"]
    return train, None


def is_local(spec: DatasetSpec) -> bool:
    """A file or directory on this machine (recipe loading made it absolute), not a hub id."""
    return Path(spec.path).exists()


def is_conversational(ds) -> bool:
    """`messages`, or prompt/completion turns (decided on the first row, as TRL does): rendered by the chat template."""
    return "messages" in ds.column_names or (len(ds) > 0 and "prompt" in ds.column_names
                                             and isinstance(ds[0]["prompt"], list))


def load_one(spec: DatasetSpec, where: str, key: str, task: str = "sft", labels: list[str] = ()):
    """One dataset, renamed and checked row by row: TRL's columns for SFT, text + label for the other tasks."""
    import datasets
    from datasets.utils import logging

    local = Path(spec.path)
    level = logging.get_verbosity()
    logging.set_verbosity(logging.CRITICAL)  # its own log lines would come before ours; ours says more
    try:
        if local.is_file():
            ds = datasets.load_dataset(DATA_SUFFIXES[local.suffix], data_files=str(local), split="train")
        else:
            ds = datasets.load_dataset(spec.path, spec.subset, split=spec.split)
    except Exception as err:  # datasets raises many types; the user needs the file, the line and the why
        if problem := file_problem(local):
            raise RecipeError(f"{spec.path}: {problem} ({key} in {where})") from None
        hint = f"; check that it is a valid {local.suffix} file" if local.is_file() else ""
        raise RecipeError(f"{where}: {key} '{spec.path}' could not be read: {reason(err)}{hint}") from None
    finally:
        logging.set_verbosity(level)
    for target, source in spec.columns.items():
        if source not in ds.column_names:
            raise RecipeError(f"{where}: {key}.columns maps '{target}' to '{source}', but {spec.path} has only "
                              f"columns {ds.column_names}")
        if source != target:
            ds = ds.remove_columns(target) if target in ds.column_names else ds
            ds = ds.rename_column(source, target)
    if task != "sft":
        fmt = next((f for f in TASK_FORMATS[task] if all(c in ds.column_names for c in HEAD_FORMATS[f])), None)
        if fmt is None:
            wanted = " or ".join(" and ".join(", ".join(f"'{c}'" for c in HEAD_FORMATS[f]).rsplit(", ", 1))
                                 for f in TASK_FORMATS[task])
            raise RecipeError(f"{spec.path}: task {task} needs columns {wanted}, it has {ds.column_names}; map "
                              f"yours with {key}.columns in {where}")
    elif not (fmt := next((f for f, cols in FORMATS.items() if all(c in ds.column_names for c in cols)), None)):
        raise RecipeError(f"{spec.path}: columns {ds.column_names} match no format (messages, prompt+completion or "
                          f"text); map yours with {key}.columns in {where}")
    ds = ds.select_columns(list(FORMATS.get(fmt) or HEAD_FORMATS[fmt]))
    if len(ds) == 0:
        raise RecipeError(f"{spec.path}: no rows ({key} in {where}); give a file with at least one row")
    number = 0  # fail on the first malformed row, by its 1-based number, before any rank trains on it
    try:
        for number, row in enumerate(ds, 1):
            if problem := _row_problem(row, fmt, labels):
                raise RecipeError(f"{spec.path}: row {number}: {problem}; fix or remove that row")
    except UnicodeDecodeError:  # pyarrow's JSON reader lets bytes that are not UTF-8 through, into the strings
        problem = file_problem(local) or f"row {number + 1}: not UTF-8 text; re-encode the file as UTF-8"
        raise RecipeError(f"{spec.path}: {problem}") from None
    if fmt == "spans":  # one form for training: words and their tags
        ds = ds.map(head_rows.to_tags, remove_columns=ds.column_names, desc="spans to tags")
    return ds


def reason(err: Exception) -> str:
    """The first line of the error that says why: datasets wraps the reader's error in a generic one."""
    while type(err).__name__ == "DatasetGenerationError" and err.__cause__ is not None:
        err = err.__cause__
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__


def file_problem(path: Path) -> str | None:
    """Why a local data file (None if not one) could not be read, by line: bytes that are not UTF-8, a JSON Lines line
    that is not a JSON object, no rows at all. Read line by line, only after the load failed (the file may be large)."""
    if path.is_file() and path.stat().st_size == 0:
        return "the file is empty; give a file with at least one row"
    if not path.is_file() or path.suffix not in (".json", ".jsonl", ".csv"):
        return None
    offset, rows = 0, 0
    with path.open("rb") as f:
        document = path.suffix == ".json" and f.read(4096).lstrip().startswith(b"[")  # a JSON array, not JSON Lines
        f.seek(0)
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                return (f"line {number} (byte {offset + err.start}): not UTF-8 text; re-encode the file as UTF-8 "
                        "(e.g. iconv -f latin1 -t utf-8)")
            offset += len(raw)
            rows += bool(line.strip())
            if not line.strip() or path.suffix == ".csv" or document:
                continue
            try:
                value = json.loads(line)
            except ValueError as err:
                return f"line {number}: not valid JSON ({err.msg}, column {err.colno}); fix or remove that line"
            if not isinstance(value, dict):
                return (f"line {number}: each line must be a JSON object of columns, got a "
                        f"{type(value).__name__}; fix or remove that line")
    if rows == 0:
        return "the file holds no rows, only blank lines; give a file with at least one row"
    if document:
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except ValueError as err:
            return f"line {err.lineno}: not valid JSON ({err.msg}, column {err.colno})"
    return None


def _row_problem(row: dict, fmt: str, labels: list[str]) -> str | None:
    for column, value in row.items():
        if value is None:  # a key missing from this row (JSON Lines) or an empty cell (CSV)
            return f"has no '{column}'"
    if fmt in HEAD_PROBLEMS:
        return HEAD_PROBLEMS[fmt](row, labels)
    if fmt == "messages":
        messages = row["messages"]
        if not isinstance(messages, list):
            return f"'messages' must be a list of messages, got {type(messages).__name__}"
        if not messages:
            return "'messages' is an empty conversation"
        if (problem := _turns_problem(messages, "messages")) or any(turn["role"] == "assistant" for turn in messages):
            return problem
        return "no assistant message: nothing to learn from this conversation"
    if fmt == "prompt_completion":
        for column in ("prompt", "completion"):
            value = row[column]
            if isinstance(value, list) and (problem := _turns_problem(value, column)):  # conversational: turns
                return problem
            if not isinstance(value, (str, list)) or not value:
                return f"'{column}' is empty or neither a string nor a list of messages"
        return None
    if not isinstance(row["text"], str) or not row["text"]:  # text, classification, regression
        return "'text' is empty or not a string"
    if fmt == "text":
        return None
    value = row["label"]
    if fmt == "regression":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
        return None if ok else f"'label' is {value!r}; regression labels are numbers"
    ok = value in labels if isinstance(value, str) else (
        isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(labels))
    return None if ok else (f"'label' is {value!r}; it must be one of head.labels {labels} or an id from 0 to "
                            f"{len(labels) - 1}")


HEAD_PROBLEMS = {"tags": head_rows.tags_problem, "spans": head_rows.spans_problem,
                 "squad": lambda row, labels: head_rows.squad_problem(row)}


def label_id(value, labels: list[str]) -> int:
    """A classification label as its id: rows may give the name or the id."""
    return labels.index(value) if isinstance(value, str) and value in labels else int(value)


def _turns_problem(turns: list, column: str) -> str | None:
    if not turns:
        return f"'{column}' is an empty list of messages"
    for number, turn in enumerate(turns, 1):
        where = f"'{column}' message {number}"
        if not isinstance(turn, dict):
            return f"{where} is {type(turn).__name__}, not a mapping with a role and a content"
        if turn.get("role") not in ROLES:
            return f"{where} has role {turn.get('role')!r}; a role is one of {', '.join(sorted(ROLES))}"
        if not isinstance(turn.get("content"), str):
            return f"{where} has no string 'content'"
    return None
