"""`launcher --help`, `launcher COMMAND --help` and `launcher keys`, written here rather than left to python-fire:
fire's help starts with an INFO line (and exits 2 for commands taking **kwargs), and cannot show the recipe's keys.
Light imports only: help must not wait for torch.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import textwrap
import typing

from launcher import schema, sft_fields
from launcher.errors import RecipeError

HELP = ("--help", "-h")
INTRO = "One YAML recipe becomes a DeepSpeed ZeRO run of TRL's SFTTrainer."
OVERRIDES = ("Recipe keys are overridden as --section.key=value (--training.learning_rate=1e-5, "
             "--data.train.0.path=rows.jsonl); `launcher keys [SECTION]` lists them.")


def requested(argv: list[str], commands: dict) -> str | None:
    """The help text argv asks for, or None: fire runs it."""
    args = argv[:argv.index("--")] if "--" in argv else argv
    if not args or args[0] in HELP:
        return overview(commands)
    if args[0] in commands and any(arg in HELP for arg in args[1:]):
        return command_help(args[0], commands[args[0]])
    return None


def overview(commands: dict) -> str:
    width = max(map(len, commands)) + 4
    lines = [textwrap.fill(_first_sentence(inspect.getdoc(fn) or ""), 118, initial_indent=f"  {name:<{width - 2}}",
                           subsequent_indent=" " * width, break_on_hyphens=False) for name, fn in commands.items()]
    return (f"usage: launcher COMMAND [ARGS] [--flag=value ...]\n\n{INTRO}\n\ncommands:\n" + "\n".join(lines)
            + f"\n\n`launcher COMMAND --help` shows a command's flags.\n{_wrap(OVERRIDES)}")


def command_help(name: str, fn) -> str:
    params = inspect.signature(fn).parameters.values()
    positional = [p for p in params if p.default is p.empty and p.kind is not p.VAR_KEYWORD]
    flags = [p for p in params if p.default is not p.empty]
    takes_recipe = any(p.name == "recipe" for p in params)
    usage = " ".join([f"launcher {name}", *(p.name.upper() for p in positional), "[--flag=value ...]",
                      *(["[--section.key=value ...]"] if takes_recipe else [])])
    rows = [(p.name.upper(), _annotation(p)) for p in positional]
    rows += [(f"--{p.name}={p.default}", _annotation(p)) for p in flags]
    width = max((len(left) for left, _ in rows), default=0) + 2
    text = f"usage: {usage}\n\n{inspect.getdoc(fn) or ''}\n\n" + "\n".join(f"  {a:<{width}}{b}" for a, b in rows)
    return text + (f"\n\n{_wrap(OVERRIDES)}" if takes_recipe else "")


def keys(section: str | None = None) -> str:
    """One line per recipe key (of SECTION only, if given): dotted name, type, default, doc."""
    sections = [f.name for f in dataclasses.fields(schema.Recipe)]
    if section is not None and str(section) not in sections:
        raise RecipeError(f"command line: no recipe section {section!r}; sections: {', '.join(sections)}")
    rows = [row for row in _rows(schema.Recipe) if section is None or row[0].split(".")[0] == str(section)]
    widths = [max(len(row[i]) for row in rows) + 2 for i in range(3)]
    return "\n".join(("".join(row[i].ljust(widths[i]) for i in range(3)) + row[3]).rstrip() for row in rows)


def _rows(cls: type, prefix: str = "") -> typing.Iterator[tuple[str, str, str, str]]:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = prefix + f.name
        yield name, _schema_type(str(f.type)), _schema_default(f), f.metadata.get("doc", "")
        if name == "training":
            yield from _training_rows()
        inner, index = _nested(hints[f.name])
        if inner is not None:
            yield from _rows(inner, f"{name}{index}.")


def _training_rows() -> typing.Iterator[tuple[str, str, str, str]]:
    """SFTConfig's fields, less those the launcher sets itself (a recipe setting them is refused)."""
    for name, field in sorted(sft_fields.fields().items()):
        if name not in schema.LAUNCHER_OWNED:
            default = "(computed)" if field.default is sft_fields.NO_DEFAULT else "= " + _value(field.default)
            yield f"training.{name}", _kinds(field.kinds), default, _first_sentence(field.help)


def _annotation(p: inspect.Parameter) -> str:
    if p.annotation is p.empty:
        return ""
    return p.annotation if isinstance(p.annotation, str) else getattr(p.annotation, "__name__", str(p.annotation))


def _nested(tp: typing.Any) -> tuple[type | None, str]:
    """The dataclass inside a field's type (a section, optional or not, or a list of them) and its index part."""
    if dataclasses.is_dataclass(tp):
        return tp, ""
    if typing.get_origin(tp) is list:
        inner, _ = _nested(typing.get_args(tp)[0])
        return inner, ".<i>"
    for member in typing.get_args(tp):
        if dataclasses.is_dataclass(member):
            return member, ""
    return None, ""


def _schema_type(source: str) -> str:
    """`FreezeSection | None` -> `mapping | None`; `Literal["a", "b"]` -> `"a" | "b"`: what the YAML holds."""
    source = re.sub(r"\b[A-Z]\w*(Section|Spec)\b", "mapping", source)
    return re.sub(r"Literal\[(.*?)\]", lambda m: m.group(1).replace(", ", " | ").replace("'", '"'), source)


def _schema_default(f: dataclasses.Field) -> str:
    if f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        return "" if dataclasses.is_dataclass(value) else "= " + _value(value)
    return "(required)" if f.default is dataclasses.MISSING else "= " + _value(f.default)


def _kinds(kinds: frozenset[str]) -> str:
    shown = [k for k in ("bool", "int", "float", "str", "list", "dict", "none") if k in kinds]
    if "float" in shown:  # sft_fields adds int to every float: YAML's 1 is a fine learning rate
        shown.remove("int")
    return " | ".join("None" if k == "none" else k for k in shown)


def _value(value: typing.Any) -> str:
    """As written in YAML (null, true, "auto", [])."""
    return json.dumps(value, default=str)


def _first_sentence(text: str) -> str:
    return re.split(r"(?<=[.!?])\s+(?=[A-Z`-])", " ".join(text.split()), maxsplit=1)[0]


def _wrap(text: str) -> str:
    return textwrap.fill(text, 118, break_on_hyphens=False, break_long_words=False)
