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

NO_DEFAULT = object()

# Where each class of SFTConfig's inheritance chain is defined, base first (later classes override defaults).
CHAIN = (
    ("transformers", "training_args.py", "TrainingArguments"),
    ("trl", "trainer/base_config.py", "_BaseConfig"),
    ("trl", "trainer/sft_config.py", "SFTConfig"),
)


@dataclass(frozen=True)
class Field:
    kinds: frozenset[str]  # subset of bool, int, float, str, list, dict, none
    default: Any
    help: str = ""  # the field's metadata={"help": ...}, for `launcher keys`


@functools.cache
def fields() -> dict[str, Field]:
    out: dict[str, Field] = {}
    for link in CHAIN:
        out.update(_fields_of(*link))
    return out


@functools.cache
def sft_only() -> frozenset[str]:
    """The fields TRL adds to transformers' TrainingArguments: SFT data handling, which the HF Trainer ignores."""
    return frozenset(set(fields()) - set(_fields_of(*CHAIN[0])))


@functools.cache
def _fields_of(package: str, module: str, cls: str) -> dict[str, Field]:
    return _class_fields(_package_dir(package) / module, cls)


def default(name: str) -> Any:
    """SFTConfig's default for `name` (NO_DEFAULT when it is not a literal)."""
    return fields()[name].default


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"{name} is not installed; install the launcher's dependencies (see README)")
    return Path(spec.submodule_search_locations[0])


def _class_fields(path: Path, cls: str) -> dict[str, Field]:
    tree = ast.parse(path.read_text())
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls)
    out = {}
    for stmt in node.body:
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            out[stmt.target.id] = Field(_kinds(stmt.annotation), _default(stmt.value), _help(stmt.value))
    return out


def _kinds(annotation: ast.expr) -> frozenset[str]:
    """Map an annotation like `int | str | None` to plain kinds; enums and Literal strings count as str."""
    kinds = set()
    for name in _names(annotation):
        kinds.add({"bool": "bool", "int": "int", "float": "float", "None": "none", "list": "list",
                   "dict": "dict", "Any": "any"}.get(name, "str"))
    if "any" in kinds:
        kinds |= {"bool", "int", "float", "str", "list", "dict", "none"}
    if "float" in kinds:
        kinds.add("int")
    return frozenset(kinds - {"any"})


def _names(node: ast.expr) -> list[str]:
    if isinstance(node, ast.BinOp):  # a | b
        return _names(node.left) + _names(node.right)
    if isinstance(node, ast.Subscript):
        base = ast.unparse(node.value)
        if base in ("Optional", "Union"):
            elts = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
            return [n for e in elts for n in _names(e)] + (["None"] if base == "Optional" else [])
        if base == "Literal":
            elts = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
            return ["bool" if isinstance(getattr(e, "value", None), bool) else "str" for e in elts]
        return [base]
    if isinstance(node, ast.Constant) and node.value is None:
        return ["None"]
    return [ast.unparse(node).rsplit(".", 1)[-1]]


def _default(value: ast.expr | None) -> Any:
    if value is None:
        return NO_DEFAULT
    if isinstance(value, ast.Call) and ast.unparse(value.func) == "field":
        value = next((kw.value for kw in value.keywords if kw.arg == "default"), None)
        if value is None:
            return NO_DEFAULT
    try:
        return ast.literal_eval(value)
    except ValueError:
        return NO_DEFAULT


def _help(value: ast.expr | None) -> str:
    """The literal "help" entry of `field(metadata={...})`; other entries may not be literals."""
    if not (isinstance(value, ast.Call) and ast.unparse(value.func) == "field"):
        return ""
    meta = next((kw.value for kw in value.keywords if kw.arg == "metadata"), None)
    if not isinstance(meta, ast.Dict):
        return ""
    for key, text in zip(meta.keys, meta.values, strict=True):
        if isinstance(key, ast.Constant) and key.value == "help" and isinstance(text, ast.Constant):
            return str(text.value)
    return ""
