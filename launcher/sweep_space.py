"""The variants of a sweep from the command line, and their short names: `--grid 'section.key=[v1, v2] ...'` (every
combination) or `--random N --space 'section.key=loguniform(1e-5, 1e-3) ...'` (N seeded draws). Values are YAML flow
syntax ([1e-5, 3e-5], [true, false], [cosine, "a b, c"], [[q_proj, v_proj], all-linear]); a distribution's arguments
are read as the flow list [its arguments]. A value runs to the next blank followed by section.key=: it may hold spaces.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import re
from typing import Any

import yaml

from launcher.errors import RecipeError

DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice")
GRID_EXAMPLE = "'training.learning_rate=[1e-5,3e-5] training.weight_decay=[0,0.1]'"
SPACE_EXAMPLE = "'training.learning_rate=loguniform(1e-5,1e-3) lora.r=choice(8,16,32)'"
_KEY = re.compile(r"(?:^|\s+)([A-Za-z_]\w*(?:\.\w+)+)=")
_CLOSE = {"[": "]", "{": "}", "'": "'", '"': '"'}


class _Loader(yaml.SafeLoader):
    """YAML with plain scalars typed as python-fire types flags: 1e-5 is a float, only true/false are booleans, null
    and none null; no, on, 010, 1:30 and 2024-01-01 stay strings (YAML 1.1: boolean, octal, sexagesimal, date)."""

    yaml_implicit_resolvers: dict = {}


for _tag, _pattern in (("bool", r"true|false"), ("null", r"~|null|none|"), ("int", r"[-+]?(?:0|[1-9][\d_]*)"),
                       ("float", r"[-+]?(?:\d[\d_]*\.[\d_]*|\.\d[\d_]*|\d[\d_]*(?=e))(?:e[-+]?\d+)?")):
    _Loader.add_implicit_resolver(f"tag:yaml.org,2002:{_tag}", re.compile(f"^(?:{_pattern})$", re.I), None)


def parse_assignments(text: Any, flag: str, example: str) -> dict[str, str]:
    """'a.b=[1, 2] c.d=choice(x, y)' -> {'a.b': '[1, 2]', 'c.d': 'choice(x, y)'}."""
    if not isinstance(text, str) or not text.strip():
        raise RecipeError(f"command line: {flag} takes one quoted string of section.key=... terms, like {example}; "
                          f"got {text!r}")
    first, *terms = _KEY.split(text.strip())
    if first:
        raise RecipeError(f"command line: {flag}: expected section.key=... at {text.strip()!r}; e.g. {example}")
    keys = terms[::2]
    if twice := next((key for i, key in enumerate(keys) if key in keys[:i]), None):
        raise RecipeError(f"command line: {flag}: {twice} is given twice")
    return {key: value.strip() for key, value in zip(keys, terms[1::2], strict=True)}


def parse_value(text: str, flag: str, key: str) -> Any:
    try:
        return yaml.load(text, _Loader)  # a SafeLoader
    except yaml.MarkedYAMLError as err:
        mark, opened = err.problem_mark, err.context_mark
        if mark and opened and mark.index == len(text) and text[opened.index] in _CLOSE:  # still open at the end
            raise RecipeError(f"command line: {flag}: {key}= is missing a closing "
                              f"{_CLOSE[text[opened.index]]!r}") from None
        problem = f"{err.problem}" + (f" at {text[mark.index:]!r}" if mark else "")
    except yaml.YAMLError as err:  # a control character, say
        problem = " ".join(str(err).split())
    raise RecipeError(f"command line: {flag}: {key}= is not YAML flow syntax: {problem}")


def parse_grid(text: Any) -> dict[str, list]:
    grid = {}
    for key, value in parse_assignments(text, "--grid", GRID_EXAMPLE).items():
        grid[key] = values = parse_value(value, "--grid", key)
        if not isinstance(values, list):
            raise RecipeError(f"command line: --grid: {key}={value} is not a list of values in brackets, like "
                              f"{key}=[1,2]")
        if not values:
            raise RecipeError(f"command line: --grid: {key}=[] lists no values")
    return grid


def parse_space(text: Any) -> dict[str, tuple[str, list]]:
    space = {}
    for key, value in parse_assignments(text, "--space", SPACE_EXAMPLE).items():
        match = re.fullmatch(r"(\w+)\((.*)", value, re.S)
        if not match or match.group(1) not in DISTRIBUTIONS:
            raise RecipeError(f"command line: --space: {key}={value} is not one of "
                              f"{', '.join(f'{d}(...)' for d in DISTRIBUTIONS)}")
        if not value.endswith(")"):
            raise RecipeError(f"command line: --space: {key}= is missing a closing ')'")
        kind, args = match.group(1), parse_value(f"[{match.group(2)[:-1]}]", "--space", key)
        where = f"command line: --space: {key}={kind}({', '.join(map(str, args))})"
        numeric = len(args) == 2 and all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)
        if kind == "choice" and not args:
            raise RecipeError(f"{where} offers no values")
        if kind != "choice" and (not numeric or args[0] > args[1]):
            raise RecipeError(f"{where} needs two numbers, low <= high")
        if kind == "randint" and not all(isinstance(a, int) for a in args):
            raise RecipeError(f"{where} needs two integers")
        if kind == "loguniform" and args[0] <= 0:
            raise RecipeError(f"{where} needs low > 0")
        space[key] = (kind, args)
    return space


def grid_points(grid: dict[str, list]) -> list[dict[str, Any]]:
    return [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]


def sample(kind: str, args: list, rng: random.Random) -> Any:
    if kind in ("choice", "randint"):
        return rng.choice(args) if kind == "choice" else rng.randint(*args)
    low, high = args
    x = math.exp(rng.uniform(math.log(low), math.log(high))) if kind == "loguniform" else rng.uniform(low, high)
    return min(max(float(f"{x:.4g}"), low), high)  # 4 digits: readable names, and still in range after rounding


def random_points(space: dict[str, tuple[str, list]], count: int, seed: int) -> list[dict[str, Any]]:
    rng, points = random.Random(seed), {}
    for _ in range(count * 100):
        point = {key: sample(kind, args, rng) for key, (kind, args) in space.items()}
        points.setdefault(json.dumps(point), point)  # a repeat would train the same variant twice
        if len(points) == count:
            return list(points.values())
    raise RecipeError(f"command line: --random {count}: the space has only {len(points)} distinct points; ask for "
                      "fewer, or use --grid")


def short(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "+".join(map(short, value))
    return str(value).lower() if isinstance(value, bool) else f"{value:g}" if isinstance(value, float) else str(value)


def variant_name(index: int, width: int, point: dict[str, Any]) -> str:
    """v03-learning_rate=1e-05-r=8: the index keeps names unique when they are cut short or values repeat."""
    parts = [f"v{index:0{width}d}", *(f"{key.rsplit('.', 1)[-1]}={short(v)}" for key, v in point.items())]
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", "-".join(parts))[:80]


def points_from_flags(grid: Any, count: Any, space: Any, seed: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    if (grid is None) == (space is None):
        raise RecipeError(f"command line: give --grid {GRID_EXAMPLE}, or --random N --space {SPACE_EXAMPLE}")
    if grid is not None:
        if count is not None:
            raise RecipeError("command line: --random N goes with --space, not --grid")
        return grid_points(parse_grid(grid)), {"grid": grid}
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise RecipeError(f"command line: --space needs --random N, the number of variants (an integer >= 1); got "
                          f"{count!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise RecipeError(f"command line: --seed must be an integer, got {seed!r}")
    return random_points(parse_space(space), count, seed), {"space": space, "random": count, "seed": seed}
