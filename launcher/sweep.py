"""`sweep`: one recipe, many variants (a grid's cartesian product, or seeded random draws from a space), each trained
into its own run directory under `<run dir>-sweep/`, one after another here or as one Slurm job array; and
`sweep_report`, which ranks the variants by a metric read from their trainer_state.json.

Every variant is planned (and its data checked) before the first one starts or anything is queued, so a typo in the
grid costs one line, not half a sweep. `sweep.json` in the sweep directory records the variants; running the same
command again resumes the sweep (finished variants are skipped), a different sweep there is refused.
"""

from __future__ import annotations

import ast
import itertools
import json
import math
import random
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher import checkpoints, rundir, topology, tracking
from launcher import plan as plans
from launcher import recipe as recipes
from launcher.errors import RecipeError
from launcher.plan import Plan
from launcher.preflight import check as check_data_and_tokenizer
from launcher.schema import did_you_mean
from launcher.topology import Topology

MANIFEST = "sweep.json"
# Set by the sweep for each variant, or shared by the whole job array: not sweepable.
FIXED = ("run.name", "run.output_dir", "run.resume", "run.consolidate")
SLURM_FLAGS = ("nodes", "gpus_per_node", "partition", "time", "account", "qos")
FLAGS = ("grid", "random", "space", "seed", "nproc_per_node", "master_port", "slurm", *SLURM_FLAGS, "max_parallel",
         "dry_run")
DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice")
GRID_EXAMPLE = "'training.learning_rate=[1e-5,3e-5] training.weight_decay=[0,0.1]'"
SPACE_EXAMPLE = "'training.learning_rate=loguniform(1e-5,1e-3) lora.r=choice(8,16,32)'"
_KEY = re.compile(r"([A-Za-z_]\w*(?:\.\w+)+)=")
_CLOSE = {"[": "]", "(": ")", "{": "}"}
# Trainer bookkeeping logged with the eval metrics, not results.
_NOT_METRICS = ("_runtime", "_samples_per_second", "_steps_per_second")


@dataclass
class Variant:
    name: str
    overrides: dict[str, Any]  # the swept keys only
    run_dir: Path


@dataclass
class Sweep:
    recipe: str
    common: dict[str, Any]  # command-line overrides, for every variant
    directory: Path
    name: str  # <run.name>-sweep: the W&B group and the Slurm job name
    run_name: str
    wandb: bool  # the recipe has a wandb section
    variants: list[Variant]
    spec: dict[str, Any]  # how the variants were made, for the manifest

    def overrides(self, variant: Variant) -> dict[str, Any]:
        """Everything a variant's run is given on top of the recipe."""
        out = {**self.common, **variant.overrides, "run.output_dir": str(variant.run_dir),
               "run.name": f"{self.run_name}-{variant.name}"}
        if (self.wandb or any(k.startswith("wandb.") for k in variant.overrides)) and "wandb.group" not in out:
            out["wandb.group"] = self.name
        return out


# --- the command line: --grid and --space strings --------------------------------------------------------------

def parse_assignments(text: Any, flag: str, example: str) -> list[tuple[str, str]]:
    """'a.b=[1, 2] c.d=choice(x,y)' -> [('a.b', '[1, 2]'), ('c.d', 'choice(x,y)')]. A value runs to the end of its
    brackets, so it may hold spaces."""
    if not isinstance(text, str) or not text.strip():
        raise RecipeError(f"command line: {flag} takes one quoted string of section.key=... terms, like {example}; "
                          f"got {text!r}")
    out, pos = [], 0
    while pos < len(text):
        if text[pos].isspace():
            pos += 1
            continue
        match = _KEY.match(text, pos)
        if not match:
            raise RecipeError(f"command line: {flag}: expected section.key=... at {text[pos:]!r}; e.g. {example}")
        end = _value_end(text, match.end(), flag, match.group(1))
        key, value = match.group(1), text[match.end():end]
        if any(key == k for k, _ in out):
            raise RecipeError(f"command line: {flag}: {key} is given twice")
        out.append((key, value))
        pos = end
    return out


def _value_end(text: str, start: int, flag: str, key: str) -> int:
    """Index just past the value beginning at `start`: the first blank outside brackets and quotes."""
    stack: list[str] = []
    quote = None
    for i in range(start, len(text)):
        ch = text[i]
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in _CLOSE:
            stack.append(_CLOSE[ch])
        elif ch in _CLOSE.values():
            if not stack or stack.pop() != ch:
                raise RecipeError(f"command line: {flag}: {key}= has an unmatched {ch!r}")
        elif ch.isspace() and not stack:
            return i
    if stack or quote:
        raise RecipeError(f"command line: {flag}: {key}= is missing a closing {quote or stack[-1]!r}")
    return len(text)


def split_items(text: str) -> list[str]:
    """Top-level comma-separated items of a list's inside: '1, [2,3], "a,b"' -> ['1', '[2,3]', '"a,b"']."""
    items, depth, quote, current = [], 0, None, ""
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[({":
            depth += 1
        elif ch in "])}":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(current.strip())
            current = ""
            continue
        current += ch
    items.append(current.strip())
    return items


def parse_value(text: str, where: str) -> Any:
    """A value as python-fire would read it on the command line: 1e-5 is a float, true a bool, cosine a string."""
    if not text:
        raise RecipeError(f"command line: {where} has an empty value")
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if text.lower() in ("null", "none"):
        return None
    if text.startswith("[") and text.endswith("]"):
        inner = text[1:-1].strip()
        return [parse_value(item, where) for item in split_items(inner)] if inner else []
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_grid(text: Any) -> dict[str, list]:
    grid = {}
    for key, value in parse_assignments(text, "--grid", GRID_EXAMPLE):
        if not (value.startswith("[") and value.endswith("]")):
            raise RecipeError(f"command line: --grid: {key}={value} is not a list of values in brackets, like "
                              f"{key}=[1,2]")
        grid[key] = parse_value(value, f"--grid {key}")
        if not grid[key]:
            raise RecipeError(f"command line: --grid: {key}=[] lists no values")
    return grid


def parse_space(text: Any) -> dict[str, tuple[str, list]]:
    space = {}
    for key, value in parse_assignments(text, "--space", SPACE_EXAMPLE):
        match = re.fullmatch(r"(\w+)\((.*)\)", value, re.S)
        if not match or match.group(1) not in DISTRIBUTIONS:
            raise RecipeError(f"command line: --space: {key}={value} is not one of "
                              f"{', '.join(f'{d}(...)' for d in DISTRIBUTIONS)}")
        kind = match.group(1)
        args = [parse_value(a, f"--space {key}") for a in split_items(match.group(2))] if match.group(2) else []
        space[key] = (kind, _check_distribution(key, kind, args))
    return space


def _check_distribution(key: str, kind: str, args: list) -> list:
    where = f"command line: --space: {key}={kind}({', '.join(map(str, args))})"
    if kind == "choice":
        if not args:
            raise RecipeError(f"{where} offers no values")
        return args
    numeric = all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)
    if len(args) != 2 or not numeric or args[0] > args[1]:
        raise RecipeError(f"{where} needs two numbers, low <= high")
    if kind == "randint" and not all(isinstance(a, int) for a in args):
        raise RecipeError(f"{where} needs two integers")
    if kind == "loguniform" and args[0] <= 0:
        raise RecipeError(f"{where} needs low > 0")
    return args


# --- the variants ----------------------------------------------------------------------------------------------

def grid_points(grid: dict[str, list]) -> list[dict[str, Any]]:
    """The cartesian product, the last key varying fastest."""
    return [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]


def sample(kind: str, args: list, rng: random.Random) -> Any:
    if kind == "choice":
        return rng.choice(args)
    if kind == "randint":
        return rng.randint(*args)
    low, high = args
    x = math.exp(rng.uniform(math.log(low), math.log(high))) if kind == "loguniform" else rng.uniform(low, high)
    return min(max(float(f"{x:.4g}"), low), high)  # 4 digits: readable names, and still in range after rounding


def random_points(space: dict[str, tuple[str, list]], count: int, seed: int) -> list[dict[str, Any]]:
    """`count` distinct draws; the same seed gives the same draws."""
    rng = random.Random(seed)
    points: list[dict[str, Any]] = []
    seen = set()
    for _ in range(count * 100):
        point = {key: sample(kind, args, rng) for key, (kind, args) in space.items()}
        if json.dumps(point) not in seen:  # a repeat would train the same variant twice
            seen.add(json.dumps(point))
            points.append(point)
            if len(points) == count:
                return points
    raise RecipeError(f"command line: --random {count}: the space has only {len(points)} distinct points; ask for "
                      "fewer, or use --grid")


def short(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "+".join(map(short, value))
    return str(value)


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


def build(recipe: str, common: dict[str, Any], points: list[dict[str, Any]], spec: dict[str, Any]) -> Sweep:
    for key in points[0]:
        if key in FIXED or key.startswith("slurm."):
            raise RecipeError(f"command line: {key} cannot be swept: the sweep sets run.name and run.output_dir per "
                              "variant, and run.resume, run.consolidate and slurm.* are shared by all")
        if key in common:
            raise RecipeError(f"command line: {key} is both swept and set with --{key}; drop one")
    base = recipes.load(recipe, common)
    directory = Path(f"{base.run.output_dir}-sweep")
    width = max(2, len(str(len(points) - 1)))
    variants = []
    for index, point in enumerate(points):
        name = variant_name(index, width, point)
        variants.append(Variant(name, point, directory / name))
    return Sweep(recipe, common, directory, f"{base.run.name}-sweep", base.run.name, base.wandb is not None,
                 variants, spec)


def validate(sweep: Sweep, topo: Topology) -> list[Plan]:
    """Plan every variant and check its data, as launch and submit would, before anything runs."""
    resolved = []
    for variant in sweep.variants:
        try:
            plan = plans.make(sweep.recipe, sweep.overrides(variant), topo)
            resume = checkpoints.resume_point(variant.run_dir, plan.recipe.run.resume, topo.world)
            if resume is not None:
                rundir.check_same_recipe(variant.run_dir, plan.files()["recipe.yaml"])
            tracking.check_credentials(plan.recipe, sweep.recipe)
            check_data_and_tokenizer(plan.recipe, sweep.recipe)
        except RecipeError as err:
            raise RecipeError(f"sweep variant {variant.name}: {err}") from None
        resolved.append(plan)
    return resolved


def is_finished(plan: Plan) -> bool:
    done = checkpoints.complete(plan.run_dir)
    return bool(done) and checkpoints.finished(done[-1])


# --- the two ways to run a sweep, as the CLI calls them ---------------------------------------------------------

def check_flags(overrides: dict[str, Any]) -> None:
    """Dotted keys are recipe overrides; anything else is a flag `sweep` does not have."""
    for key in overrides:
        if not recipes.is_override(key) and key != "resume":
            raise RecipeError(f"command line: unknown option --{key}{did_you_mean(key, FLAGS)}; recipe overrides "
                              "look like --section.key=value")


def here(recipe: str, overrides: dict[str, Any], points: list, spec: dict, nproc_per_node: Any, master_port: Any,
         dry_run: bool) -> int:
    """Validate every variant, then train them one after another on this machine; returns how many failed."""
    port = topology.DEFAULT_PORT if master_port is None else master_port
    topo = topology.from_flags(nproc_per_node, master_port=port)
    flags = [*(["--nproc_per_node", str(nproc_per_node)] if nproc_per_node is not None else []),
             *(["--master_port", str(master_port)] if master_port is not None else [])]
    sweep = build(recipe, overrides, points, spec)
    resolved = validate(sweep, topo)
    open_manifest(sweep)  # refuses another sweep's directory before anything is written
    if dry_run:
        print(f"sweep {sweep.directory}: {len(sweep.variants)} variants, {topo} each (dry run: nothing written, "
              "nothing run)")
        for variant in sweep.variants:
            print(f"{variant.name}: {shlex.join(['launcher', *launch_command(sweep, variant, flags)[3:]])}")
        return 0
    failed = run_local(sweep, resolved, flags)
    print(render_report(report(str(sweep.directory))), flush=True)
    return failed


def on_slurm(recipe: str, overrides: dict[str, Any], points: list, spec: dict, flags: dict[str, Any],
             max_parallel: Any, dry_run: bool) -> None:
    """Validate every variant for the job's ranks, then submit one job array, a task per variant."""
    overrides = {**overrides, **{f"slurm.{k}": v for k, v in flags.items() if v is not None}}
    options = recipes.load(recipe, overrides).slurm
    if options.gpus_per_node is None:
        raise RecipeError(f"{recipe}: slurm.gpus_per_node is not set; pass --gpus_per_node (ranks per node)")
    topo = Topology((options.gpus_per_node,) * options.nodes)
    sweep = build(recipe, overrides, points, spec)
    submit(sweep, validate(sweep, topo), options, max_parallel, dry_run)


# --- the manifest ----------------------------------------------------------------------------------------------

def manifest(sweep: Sweep) -> dict[str, Any]:
    data = {"name": sweep.name, "recipe": str(Path(sweep.recipe).absolute()), **sweep.spec, "overrides": sweep.common,
            "variants": [{"name": v.name, "overrides": v.overrides, "run_dir": str(v.run_dir)} for v in sweep.variants]}
    return json.loads(json.dumps(data))  # as it will read back: tuples are lists


def _identity(data: dict[str, Any]) -> tuple:
    return data.get("overrides"), [(v["name"], v["overrides"]) for v in data.get("variants", [])]


def open_manifest(sweep: Sweep) -> dict[str, Any]:
    """This sweep's manifest, carrying over what an earlier run of the same sweep recorded; refuses another sweep's
    directory, whose run directories this one would mix with its own."""
    data = manifest(sweep)
    path = sweep.directory / MANIFEST
    if not path.is_file():
        return data
    try:
        old = json.loads(path.read_text())
    except ValueError:
        raise RecipeError(f"{path}: not valid JSON; move it away to start this sweep afresh") from None
    if _identity(old) != _identity(data):
        raise RecipeError(f"{path}: this directory holds a different sweep ({_difference(old, data)}); run that "
                          "sweep's own command to resume it, or pick another --run.output_dir or --run.name")
    for before, now in zip(old["variants"], data["variants"], strict=True):
        now.update({k: before[k] for k in ("exit_code", "job") if k in before})
    return data


def _difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    if old.get("overrides") != new.get("overrides"):
        return f"its overrides were {old.get('overrides')}, now {new.get('overrides')}"
    names = [v["name"] for v in old["variants"]], [v["name"] for v in new["variants"]]
    return f"its variants are {', '.join(names[0])}; now {', '.join(names[1])}"


def write_manifest(directory: Path, data: dict[str, Any]) -> None:
    rundir.write_atomic(directory / MANIFEST, json.dumps(data, indent=2) + "\n")


# --- running: here, one variant after another ------------------------------------------------------------------

def launch_command(sweep: Sweep, variant: Variant, flags: list[str]) -> list[str]:
    return [sys.executable, "-m", "launcher", "launch", sweep.recipe, *flags,
            *(f"--{key}={fire_literal(value)}" for key, value in sweep.overrides(variant).items())]


def fire_literal(value: Any) -> str:
    """The text python-fire reads back as `value`: a path as it is, but the string '1e-05' quoted."""
    from fire import parser

    if isinstance(value, str) and parser.DefaultParseValue(value) == value:
        return value
    return repr(value)


def run_local(sweep: Sweep, resolved: list[Plan], flags: list[str]) -> int:
    """Train the variants in turn, past failures; returns how many failed."""
    data = open_manifest(sweep)
    write_manifest(sweep.directory, data)
    total = len(sweep.variants)
    print(f"sweep {sweep.directory}: {total} variants", flush=True)
    for i, (variant, plan, entry) in enumerate(zip(sweep.variants, resolved, data["variants"], strict=True), 1):
        if is_finished(plan):
            print(f"[{i}/{total}] {variant.name}: already trained to the end; skipped", flush=True)
            entry["exit_code"] = 0
            continue
        command = launch_command(sweep, variant, flags)
        print(f"[{i}/{total}] {variant.name}: {shlex.join(['launcher', *command[3:]])}", flush=True)
        entry["exit_code"] = subprocess.run(command).returncode
        write_manifest(sweep.directory, data)
        if entry["exit_code"] != 0:
            print(f"[{i}/{total}] {variant.name}: failed (exit code {entry['exit_code']}); going on with the next",
                  file=sys.stderr, flush=True)
    write_manifest(sweep.directory, data)
    return sum(1 for entry in data["variants"] if entry["exit_code"] != 0)


# --- running: one Slurm job array ------------------------------------------------------------------------------

def submit(sweep: Sweep, resolved: list[Plan], options, max_parallel: Any, dry_run: bool) -> None:
    from launcher import slurm

    if max_parallel is not None and (isinstance(max_parallel, bool) or not isinstance(max_parallel, int)
                                     or max_parallel < 1):
        raise RecipeError(f"command line: --max_parallel must be an integer >= 1, got {max_parallel!r}")
    data = open_manifest(sweep)
    pending = [i for i, plan in enumerate(resolved) if not is_finished(plan)]
    gpus = slurm.cluster_has_gpus()
    script = slurm.render(sweep.directory, sweep.name, options, resolved[0].recipe.run.consolidate, gpus,
                          array=[sweep.variants[i].run_dir for i in pending], max_parallel=max_parallel)
    tasks = "\n".join(f"task {t}: {sweep.variants[i].name} -> {sweep.variants[i].run_dir}"
                      for t, i in enumerate(pending))
    header = (f"sweep {sweep.directory}: {len(sweep.variants)} variants, {len(pending)} to train\n"
              f"{resolved[0].batch}\n{resolved[0].topology} per variant ({'GPU' if gpus else 'CPU'} ranks)\n"
              f"log: {slurm.log_pattern(sweep.directory, array=True)}\n{tasks}")
    if dry_run:
        print(f"{header}\n--- {sweep.directory / slurm.SCRIPT} (dry run: nothing written, nothing submitted)\n"
              f"{script}" if pending else header)
        return
    if not pending:
        print(f"{header}\nevery variant is already trained to the end; nothing to submit", flush=True)
        return
    active = slurm.active_job_for(sweep.directory) if shutil.which("squeue") else None
    if active:
        raise RecipeError(f"{sweep.directory}: job {active} is already training this sweep; wait for it or cancel it "
                          f"(scancel {active})")
    for i in pending:
        plan = resolved[i]
        rundir.prepare(plan.run_dir, {"recipe.yaml": recipes.dump(plan.recipe),
                                      "ds_config.json": plan.files()["ds_config.json"]})
    (sweep.directory / "logs").mkdir(parents=True, exist_ok=True)
    rundir.write_atomic(sweep.directory / slurm.SCRIPT, script)
    write_manifest(sweep.directory, data)
    job = slurm.sbatch(sweep.directory / slurm.SCRIPT)
    for task, i in enumerate(pending):
        data["variants"][i]["job"] = f"{job}_{task}"
    write_manifest(sweep.directory, data)
    at_most = f", at most {max_parallel} at a time" if max_parallel else ""
    log = slurm.log_pattern(sweep.directory, array=True).replace("%x", sweep.name).replace("%A", job)
    print(f"{header}\nsubmitted job array {job} ({len(pending)} tasks{at_most})\nlog: {log}\n"
          f"report: launcher sweep_report {sweep.directory}", flush=True)


# --- the report ------------------------------------------------------------------------------------------------

def load_manifest(where: str) -> tuple[Path, dict[str, Any]]:
    path = Path(where)
    path = path if path.name == MANIFEST else path / MANIFEST
    if not path.is_file():
        raise RecipeError(f"{where}: no {MANIFEST} here; give the sweep directory `launcher sweep` printed "
                          "(<run dir>-sweep)")
    try:
        return path.parent, json.loads(path.read_text())
    except ValueError:
        raise RecipeError(f"{path}: not valid JSON") from None


def trainer_state(run_dir: Path) -> dict[str, Any] | None:
    """The loss history: written beside the checkpoints when training ends, else the newest checkpoint's."""
    candidates = [checkpoints.directory(run_dir) / "trainer_state.json",
                  *(c / "trainer_state.json" for c in reversed(checkpoints.listing(run_dir)))]
    for path in candidates:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            continue
    return None


def last_values(state: dict[str, Any] | None) -> dict[str, float]:
    """Each logged key's last value (loss, eval_loss, train_loss, ...)."""
    out: dict[str, float] = {}
    for entry in (state or {}).get("log_history", []):
        out.update({k: v for k, v in entry.items() if isinstance(v, (int, float)) and k not in ("step", "epoch")})
    return out


def status(entry: dict[str, Any], run_dir: Path, state: dict[str, Any] | None) -> str:
    done = checkpoints.complete(run_dir)
    if done and checkpoints.finished(done[-1]):
        return "finished"
    if entry.get("exit_code") not in (None, 0):
        return f"failed (exit {entry['exit_code']})"
    if entry.get("job"):
        from launcher import slurm

        state_now = slurm.job_state(entry["job"])
        if state_now and state_now != "COMPLETED":
            return f"{state_now.lower()} (job {entry['job']})"
    return "incomplete" if state else "not run"


def report(where: str, metric: str | None = None) -> dict[str, Any]:
    """The variants, best first by `metric`; those without it (failed, not run) last, in sweep order."""
    directory, data = load_manifest(where)
    rows = []
    for entry in data["variants"]:
        run_dir = Path(entry["run_dir"])
        if not run_dir.exists() and (directory / entry["name"]).exists():  # the sweep was moved or copied here
            run_dir = directory / entry["name"]
        state = trainer_state(run_dir)
        values = last_values(state)
        evals = {k: v for k, v in values.items() if k.startswith("eval_") and not k.endswith(_NOT_METRICS)}
        rows.append({"variant": entry["name"], "overrides": entry["overrides"], "run_dir": str(run_dir),
                     "status": status(entry, run_dir, state), "steps": state.get("global_step") if state else None,
                     "max_steps": state.get("max_steps") if state else None, "loss": values.get("loss"),
                     "eval": evals, "values": values})
    logged = sorted({k for row in rows for k in row["values"]})
    if metric is None:
        metric = "eval_loss" if "eval_loss" in logged else "loss"
    elif logged and metric not in logged:
        raise RecipeError(f"{directory}: no variant logged {metric!r}; logged: {', '.join(logged)}")
    lower = "loss" in metric
    ranked = sorted((r for r in rows if metric in r["values"]), key=lambda r: r["values"][metric], reverse=not lower)
    unranked = [r for r in rows if metric not in r["values"]]
    for rank, row in enumerate(ranked, 1):
        row["rank"] = rank
    for row in rows:
        row["metric"] = row["values"].pop(metric, None)
        row.pop("values")
    return {"sweep": str(directory), "name": data.get("name"), "metric": metric,
            "better": "lower" if lower else "higher", "variants": [*ranked, *unranked]}


def render_report(result: dict[str, Any]) -> str:
    metric = result["metric"]
    evals = any("eval_loss" in r["eval"] for r in result["variants"])
    extra = [metric] if metric not in ("loss", "eval_loss") else []
    lines = [["#", "variant", "steps", "loss", *(["eval_loss"] if evals else []), *extra, "status", "overrides"]]
    for r in result["variants"]:
        steps = f"{r['steps']}/{r['max_steps']}" if r["steps"] is not None else "-"
        lines.append([str(r.get("rank", "-")), r["variant"], steps, _number(r["loss"]),
                      *([_number(r["eval"].get("eval_loss"))] if evals else []),
                      *([_number(r["metric"])] if extra else []), r["status"],
                      " ".join(f"{k}={short(v)}" for k, v in r["overrides"].items())])
    widths = [max(len(row[i]) for row in lines) for i in range(len(lines[0]))]
    table = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in lines]
    title = (f"sweep {result['sweep']}: {len(result['variants'])} variants, ranked by {metric} "
             f"({result['better']} is better)")
    return "\n".join([title, *table])


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"
