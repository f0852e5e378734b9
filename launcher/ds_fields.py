"""The DeepSpeed config keys DeepSpeed knows, read from the installed DeepSpeed's sources; `plan` refuses the others.

DeepSpeed rejects an unknown key inside its pydantic sections (zero_optimization, bf16, ...: extra="forbid") only
when the engine starts on the ranks, after the queue wait, and silently ignores an unknown top-level key. Importing
deepspeed costs seconds (it imports torch); parsing its config modules costs ~40 ms and reads whatever version is
installed. tests/unit/test_ds_fields.py checks the result against DeepSpeed's models and the keys it looks up.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
from pathlib import Path

from launcher.errors import RecipeError
from launcher.schema import did_you_mean

# Top-level keys: what these functions look up in the config dict (the variable named), following the calls that
# pass it on. DeepSpeed reads every top-level key by name, so there are no others.
TOP = (("__init__.py", "initialize", "config"),  # sequence/data_parallel_size; DeepSpeedConfig.__init__ via the call
       ("runtime/config.py", "DeepSpeedConfig._initialize_params", "param_dict"),
       ("runtime/config.py", "DeepSpeedConfig._do_warning_check", "self._param_dict"))
# Sections parsed by a pydantic model: its fields and their aliases, nested models likewise.
MODELS = {"zero_optimization": ("runtime/zero/config.py", "DeepSpeedZeroConfig"),
          "bf16": ("runtime/precision_config.py", "DeepSpeedBF16Config"),
          "bfloat16": ("runtime/precision_config.py", "DeepSpeedBF16Config"),  # bf16's old name, still read
          "fp16": ("runtime/precision_config.py", "DeepSpeedFP16Config"),
          "comms_logger": ("comm/config.py", "CommsLoggerConfig"),
          "hybrid_engine": ("runtime/config.py", "HybridEngineConfig"),
          "compile": ("compile/config.py", "CompileConfig"),
          "tensor_parallel": ("runtime/tensor_parallel/config.py", "TPTrainingConfig"),
          "weight_quantization": ("inference/config.py", "WeightQuantConfig"),
          **{key: ("monitor/config.py", cls) for key, cls in (("tensorboard", "TensorBoardConfig"), (
              "wandb", "WandbConfig"), ("csv_monitor", "CSVConfig"), ("comet", "CometConfig"))}}
# Sections whose whole dict one function reads key by key (it ignores the others).
READERS = {"activation_checkpointing": ("runtime/activation_checkpointing/config.py",
                                        "DeepSpeedActivationCheckpointingConfig._initialize", "act_chkpt_config_dict"),
           "flops_profiler": ("profiling/config.py", "DeepSpeedFlopsProfilerConfig._initialize", "flops_profiler_dict")}
# optimizer and scheduler: the runtime/constants.py names that get_optimizer_* / get_scheduler_* look up. Their
# params go to the torch optimizer or scheduler as keyword arguments, so they are not checked.
CONSTANTS = {"optimizer": ("TYPE", "OPTIMIZER_PARAMS", "LEGACY_FUSION"), "scheduler": ("TYPE", "SCHEDULER_PARAMS")}
# Every other section (checkpoint, data_types, data_efficiency, pipeline, aio, autotuning, timers, torch_autocast,
# expert_parallel, datastates_ckpt, ...) is checked at its top level only: DeepSpeed reads them through helper
# variables or in several places, which this reading cannot follow reliably.


def check(ds: dict, overrides: dict, where: str, label: str) -> None:
    """Refuse a key DeepSpeed does not know, at any depth, named as written: deepspeed.overrides.X in the recipe
    `where`, or X in the template `label`."""
    _check(ds, keys(), (), overrides, where, label)


def _check(config: dict, known: dict, path: tuple, overrides: dict, where: str, label: str) -> None:
    for key, value in config.items():
        here = (*path, str(key))
        if here[-1] not in known:
            dotted = ".".join(here)
            source = f"{where}: deepspeed.overrides.{dotted}" if _within(overrides, here) else f"{label}: {dotted}"
            raise RecipeError(f"{source} is not a DeepSpeed key" + did_you_mean(here[-1], known))
        if isinstance(value, dict) and known[here[-1]] is not None:
            _check(value, known[here[-1]], here, overrides, where, label)


def _within(tree, path: tuple) -> bool:
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return False
        tree = tree[key]
    return True


@functools.cache
def keys() -> dict[str, dict | None]:
    """Every key DeepSpeed reads, top level first: a dict of the keys below for a checked section, else None."""
    known: dict[str, dict | None] = dict.fromkeys(sorted(set().union(*(_reads(*entry) for entry in TOP))))
    sections = {**{key: _model(*where) for key, where in MODELS.items()},
                **{key: dict.fromkeys(sorted(_reads(*where))) for key, where in READERS.items()},
                **{key: dict.fromkeys(_const("runtime/constants.py", name) for name in names)
                   for key, names in CONSTANTS.items()}}
    known.update((key, section) for key, section in sections.items() if key in known)
    return known


@functools.cache
def _root() -> Path:
    spec = importlib.util.find_spec("deepspeed")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("deepspeed is not installed; install the launcher's dependencies (see README)")
    return Path(spec.submodule_search_locations[0])


@functools.cache
def _tree(module: str) -> ast.Module:
    return ast.parse((_root() / module).read_text(encoding="utf-8"))


def _source(module: str, node: ast.ImportFrom) -> str | None:
    """The file (relative to deepspeed/) that an import in `module` reads from; None outside deepspeed."""
    if node.level:
        parts = module.split("/")[:-node.level] + (node.module.split(".") if node.module else [])
    elif node.module and node.module.split(".")[0] == "deepspeed":
        parts = node.module.split(".")[1:]
    else:
        return None
    base = "/".join(parts)
    return next((f for f in (f"{base}.py", f"{base}/__init__.py".lstrip("/")) if (_root() / f).is_file()), None)


@functools.cache
def _const(module: str, name: str) -> str | None:
    """The string that constant `name` is in `module`: its last binding there, NAME = "key" or an import."""
    for node in reversed(_tree(module).body):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return node.value.value if isinstance(node.value, ast.Constant) and isinstance(node.value.value, str) \
                else None
        for alias in node.names if isinstance(node, ast.ImportFrom) else ():
            if alias.name == "*" or (alias.asname or alias.name) == name:
                source = _source(module, node)
                value = _const(source, name if alias.name == "*" else alias.name) if source else None
                if value or alias.name != "*":  # a * import without the name leaves it to the lines above
                    return value
    return None


def _find(module: str, qual: str) -> tuple[str, ast.FunctionDef | ast.ClassDef | None]:
    """The def or class `qual` ("f", "Class" or "Class.method") of `module`, or of the module it imports it from."""
    head, _, method = qual.partition(".")
    for node in _tree(module).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == head:
            return module, node if not method else next(
                (n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == method), None)
        for alias in node.names if isinstance(node, ast.ImportFrom) else ():
            if (alias.asname or alias.name) == head and (source := _source(module, node)):
                return _find(source, f"{alias.name}.{method}" if method else alias.name)
    return module, None


_ACTIVE: set = set()  # the _reads calls in progress: a call cycle reads nothing more


@functools.cache
def _reads(module: str, qual: str, var: str) -> frozenset[str | int]:
    """The keys function `qual` looks up in its dict `var` (d[K], d.get(K), K in d), following the calls that pass
    `var` on. An int i means "the key given as parameter i", as in get_scalar_param(param_dict, NAME, default)."""
    module, fn = _find(module, qual)
    if not isinstance(fn, ast.FunctionDef) or (module, qual, var) in _ACTIVE:
        return frozenset()
    _ACTIVE.add((module, qual, var))
    params, out = [a.arg for a in fn.args.args], set()
    loops = {n.target.id: n.iter.elts for n in ast.walk(fn) if isinstance(n, (ast.For, ast.comprehension))
             and isinstance(n.target, ast.Name) and isinstance(n.iter, (ast.Tuple, ast.List))}

    def names(expr: ast.expr) -> set:  # what a key expression stands for: "key", a constant, a loop, a parameter
        if isinstance(expr, ast.Constant) and isinstance(expr.value, str):
            return {expr.value}
        if not isinstance(expr, ast.Name):
            return set()
        if expr.id in loops:
            return set().union(*map(names, loops[expr.id]))
        return {params.index(expr.id)} if expr.id in params else {_const(module, expr.id)} - {None}

    def is_var(expr: ast.expr, keys_too: bool = True) -> bool:  # var, or var.keys()
        if keys_too and isinstance(expr, ast.Call) and isinstance(expr.func, ast.Attribute) and \
                expr.func.attr == "keys":
            expr = expr.func.value
        return _dotted(expr) == var

    for node in ast.walk(fn):
        if isinstance(node, ast.Subscript) and is_var(node.value, False):
            out |= names(node.slice)
        elif isinstance(node, ast.Compare) and isinstance(node.ops[0], (ast.In, ast.NotIn)) and \
                is_var(node.comparators[0]):
            out |= names(node.left)
        elif isinstance(node, ast.Call):
            if isinstance(node.func, ast.Attribute) and node.func.attr == "get" and is_var(node.func.value, False):
                out |= names(node.args[0]) if node.args else set()
            for i, arg in enumerate(node.args):
                if is_var(arg, False):
                    out |= _passed_on(module, qual, node, i, names)
    _ACTIVE.discard((module, qual, var))
    return frozenset(out)


def _dotted(expr: ast.expr) -> str | None:
    """`name` or `name.attr` as text (ast.unparse, but fast: it is asked of every subscript and argument)."""
    if isinstance(expr, ast.Name):
        return expr.id
    return f"{expr.value.id}.{expr.attr}" if isinstance(expr, ast.Attribute) and isinstance(expr.value, ast.Name) \
        else None


def _passed_on(module: str, qual: str, call: ast.Call, i: int, names) -> set:
    """The keys read by the function `call` passes the dict to as its positional argument i."""
    func, owner = call.func, qual.rpartition(".")[0]
    if isinstance(func, ast.Name):
        target = func.id
    elif isinstance(func, ast.Attribute) and _dotted(func.value) == "self" and owner:
        target = f"{owner}.{func.attr}"
    else:
        return set()
    where, node = _find(module, target)
    if isinstance(node, ast.ClassDef):  # Config(param_dict): its __init__
        target = f"{node.name}.__init__"
        where, node = _find(where, target)
    if not isinstance(node, ast.FunctionDef):
        return set()
    params = [a.arg for a in node.args.args]
    shift = 1 if "." in target else 0  # self
    if i + shift >= len(params):
        return set()
    out = set()
    for key in _reads(where, target, params[i + shift]):
        if isinstance(key, str):
            out.add(key)
            continue
        j = key - shift  # the caller's argument for the callee's parameter `key`: positional, keyword or default
        given = call.args[j] if j < len(call.args) else next(
            (k.value for k in call.keywords if k.arg == params[key]), None)
        if given is not None:
            out |= names(given)
        elif (d := key - (len(params) - len(node.args.defaults))) >= 0:
            default = node.args.defaults[d]
            out |= {default.value} if isinstance(default, ast.Constant) else {
                _const(where, default.id) if isinstance(default, ast.Name) else None}
    return out - {None}


@functools.cache
def _model(module: str, cls: str) -> dict[str, dict | None]:
    """A pydantic model's keys: field names and aliases (populate_by_name takes both), nested models as dicts."""
    module, node = _find(module, cls)
    out = {}
    for base in node.bases:  # a base model's fields first
        if isinstance(base, ast.Name) and _is_model(module, base.id):
            out.update(_model(module, base.id))
    for stmt in node.body:
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and \
                not stmt.target.id.startswith("_") and stmt.target.id != "model_config":
            sub = next((_model(module, n) for n in _union(stmt.annotation) if _is_model(module, n)), None)
            out[stmt.target.id] = sub
            if isinstance(stmt.value, ast.Call):
                out.update({k.value.value: sub for k in stmt.value.keywords
                            if k.arg == "alias" and isinstance(k.value, ast.Constant)})
    return out


def _union(annotation: ast.expr) -> list[str]:
    """The class names an annotation allows: X, Optional[X], Union[X, Y], X | None (not list or dict members)."""
    if isinstance(annotation, ast.Name):
        return [annotation.id]
    if isinstance(annotation, ast.Constant) and isinstance(annotation.value, str):
        return [annotation.value]
    if isinstance(annotation, ast.BinOp):
        return _union(annotation.left) + _union(annotation.right)
    if isinstance(annotation, ast.Subscript) and ast.unparse(annotation.value) in ("Optional", "Union"):
        elts = annotation.slice.elts if isinstance(annotation.slice, ast.Tuple) else [annotation.slice]
        return [name for e in elts for name in _union(e)]
    return []


def _is_model(module: str, name: str) -> bool:
    module, node = _find(module, name)
    return isinstance(node, ast.ClassDef) and any(
        isinstance(b, ast.Name) and (b.id == "DeepSpeedConfigModel" or _is_model(module, b.id)) for b in node.bases)
