"""SFTConfig's fields (names, accepted kinds, defaults), read from the installed TRL and transformers sources.

Importing trl costs seconds (it imports torch); `plan` must not. Parsing the two source files costs ~25 ms and never
goes stale: it reads whatever version is installed. A test checks the result against `dataclasses.fields(SFTConfig)`.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

NO_DEFAULT = object()  # a field's default when it is not a literal

# Where each class of SFTConfig's inheritance chain is defined, base first (later classes override defaults).
CHAIN = (("transformers", "training_args.py", "TrainingArguments"), ("trl", "trainer/base_config.py", "_BaseConfig"),
         ("trl", "trainer/sft_config.py", "SFTConfig"))


@dataclass(frozen=True)
class Field:
    kinds: frozenset[str]  # subset of bool, int, float, str, list, dict, none
    default: Any
    help: str = ""  # the field's metadata={"help": ...}, for `launcher keys`


@functools.cache
def fields() -> dict[str, Field]:
    return {name: field for link in CHAIN for name, field in _fields_of(*link).items()}


@functools.cache
def sft_only() -> frozenset[str]:
    """The fields TRL adds to transformers' TrainingArguments: SFT data handling, which the HF Trainer ignores."""
    return frozenset(set(fields()) - set(_fields_of(*CHAIN[0])))


@functools.cache
def _fields_of(package: str, module: str, cls: str) -> dict[str, Field]:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"{package} is not installed; install the launcher's dependencies (see README)")
    tree = ast.parse((Path(spec.submodule_search_locations[0]) / module).read_text())
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls)
    return {stmt.target.id: _field(stmt) for stmt in node.body
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)}


KINDS = {"bool": "bool", "int": "int", "float": "float", "None": "none", "list": "list", "dict": "dict"}


def _names(node: ast.expr) -> list[str]:
    if isinstance(node, ast.BinOp):  # a | b
        return _names(node.left) + _names(node.right)
    if isinstance(node, ast.Subscript):
        base = ast.unparse(node.value)
        elts = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        if base in ("Optional", "Union"):
            return [n for e in elts for n in _names(e)] + (["None"] if base == "Optional" else [])
        if base == "Literal":
            return ["bool" if isinstance(getattr(e, "value", None), bool) else "str" for e in elts]
        return [base]
    if isinstance(node, ast.Constant) and node.value is None:
        return ["None"]
    return [ast.unparse(node).rsplit(".", 1)[-1]]


def _field(stmt: ast.AnnAssign) -> Field:
    """`name: kind = value` or `= field(default=..., metadata={"help": ...})`; only literals are read."""
    value, keywords = stmt.value, {}
    if isinstance(value, ast.Call) and ast.unparse(value.func) == "field":
        keywords = {kw.arg: kw.value for kw in value.keywords}
        value = keywords.get("default")
    try:
        default = NO_DEFAULT if value is None else ast.literal_eval(value)
    except ValueError:
        default = NO_DEFAULT
    meta = keywords.get("metadata")
    helps = [str(text.value) for key, text in zip(meta.keys, meta.values, strict=True)
             if isinstance(key, ast.Constant) and key.value == "help" and isinstance(text, ast.Constant)
             ] if isinstance(meta, ast.Dict) else []
    # the annotation (`int | str | None`) as plain kinds: enums and Literal strings count as str; a float takes ints
    names = _names(stmt.annotation)
    kinds = {*KINDS.values(), "str"} if "Any" in names else {KINDS.get(name, "str") for name in names}
    return Field(frozenset(kinds | {"int"} if "float" in kinds else kinds), default, helps[0] if helps else "")
