"""`launcher --help`, `launcher COMMAND --help` and `launcher keys`, written here: python-fire's help starts with an
INFO line (and exits 2 for commands taking **kwargs), and cannot show the recipe's keys. Light imports only."""

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
OVERRIDES = textwrap.fill("Recipe keys are overridden as --section.key=value (--training.learning_rate=1e-5, "
                          "--data.train.0.path=rows.jsonl); `launcher keys [SECTION]` lists them.", 118,
                          break_on_hyphens=False, break_long_words=False)
_default = lambda value: "= " + json.dumps(value, default=str)  # as written in YAML: = null, = true, = "auto", = []


def requested(argv: list[str], commands: dict) -> str | None:
    """The help text argv asks for (the overview, or a command's), or None: fire runs it."""
    args = argv[:argv.index("--")] if "--" in argv else argv
    if args and args[0] not in HELP:
        wanted = args[0] in commands and any(arg in HELP for arg in args[1:])
        return command_help(args[0], commands[args[0]]) if wanted else None
    width = max(map(len, commands)) + 4
    lines = [textwrap.fill(_first_sentence(inspect.getdoc(fn) or ""), 118, initial_indent=f"  {name:<{width - 2}}",
                           subsequent_indent=" " * width, break_on_hyphens=False) for name, fn in commands.items()]
    return (f"usage: launcher COMMAND [ARGS] [--flag=value ...]\n\n{INTRO}\n\ncommands:\n" + "\n".join(lines)
            + f"\n\n`launcher COMMAND --help` shows a command's flags.\n{OVERRIDES}")


def command_help(name: str, fn) -> str:
    params = [p for p in inspect.signature(fn).parameters.values() if p.kind is not p.VAR_KEYWORD]
    takes_recipe = any(p.name == "recipe" for p in params)
    usage = " ".join([f"launcher {name}", *(p.name.upper() for p in params if p.default is p.empty),
                      "[--flag=value ...]", *(["[--section.key=value ...]"] if takes_recipe else [])])
    # positional arguments first, then the flags: python's order; cli.py's annotations are strings
    rows = [(p.name.upper() if p.default is p.empty else f"--{p.name}={p.default}",
             "" if p.annotation is p.empty else str(p.annotation)) for p in params]
    width = max((len(left) for left, _ in rows), default=0) + 2
    text = f"usage: {usage}\n\n{inspect.getdoc(fn) or ''}\n\n" + "\n".join(f"  {a:<{width}}{b}" for a, b in rows)
    return text + (f"\n\n{OVERRIDES}" if takes_recipe else "")


def keys(section: str | None = None) -> str:
    sections = [f.name for f in dataclasses.fields(schema.Recipe)]
    if section is not None and str(section) not in sections:
        raise RecipeError(f"command line: no recipe section {section!r}; sections: {', '.join(sections)}")
    rows = [row for row in _rows(schema.Recipe) if section is None or row[0].split(".")[0] == str(section)]
    widths = [max(len(row[i]) for row in rows) + 2 for i in range(3)]
    return "\n".join(("".join(row[i].ljust(widths[i]) for i in range(3)) + row[3]).rstrip() for row in rows)


def _rows(cls: type, prefix: str = "") -> typing.Iterator[tuple[str, str, str, str]]:
    """Each key's dotted name, type as the YAML holds it (`FreezeSection | None` -> `mapping | None`, `Literal["a",
    "b"]` -> `"a" | "b"`), default and doc."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name, kind = prefix + f.name, re.sub(r"\b[A-Z]\w*(Section|Spec)\b", "mapping", str(f.type))
        kind = re.sub(r"Literal\[(.*?)\]", lambda m: m.group(1).replace(", ", " | ").replace("'", '"'), kind)
        value = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        default = ("(required)" if value is dataclasses.MISSING else "" if dataclasses.is_dataclass(value)
                   else _default(value))
        yield name, kind, default, f.metadata.get("doc", "")
        if name == "training":  # SFTConfig's fields, less those the launcher sets itself (a recipe may not set them)
            for key, arg in sorted(sft_fields.fields().items()):
                if key not in schema.LAUNCHER_OWNED:
                    default = "(computed)" if arg.default is sft_fields.NO_DEFAULT else _default(arg.default)
                    # float, not int | float: sft_fields adds int to every float (YAML's 1 is a fine learning rate)
                    kinds = " | ".join(k for k in ("bool", "int", "float", "str", "list", "dict", "None")
                                       if k.lower() in arg.kinds and not (k == "int" and "float" in arg.kinds))
                    yield f"training.{key}", kinds, default, _first_sentence(arg.help)
        inner, index = _nested(hints[f.name])
        if inner is not None:
            yield from _rows(inner, f"{name}{index}.")


def _nested(tp: typing.Any) -> tuple[type | None, str]:
    """The dataclass inside a field's type (a section, optional or not, or a list of them) and its index part."""
    if typing.get_origin(tp) is list:
        return _nested(typing.get_args(tp)[0])[0], ".<i>"
    return next((t for t in (tp, *typing.get_args(tp)) if dataclasses.is_dataclass(t)), None), ""


def _first_sentence(text: str) -> str:
    return re.split(r"(?<=[.!?])\s+(?=[A-Z`-])", " ".join(text.split()), maxsplit=1)[0]
