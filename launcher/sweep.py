"""`sweep`: one recipe, many variants (a grid's cartesian product, or seeded random draws from a space), each trained
into its own run directory under `<run dir>-sweep/`, one after another here or as one Slurm job array; and
`sweep_report`, which ranks the variants by a metric read from their trainer_state.json.

Every variant is planned (and its data checked) before the first one starts or anything is queued, so a typo in the
grid costs one line, not half a sweep. `sweep.json` in the sweep directory records the variants; running the same
command again resumes the sweep (finished variants are skipped), a different sweep there is refused.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher import pipeline, rundir, topology
from launcher import recipe as recipes
from launcher.errors import RecipeError
from launcher.sweep_report import MANIFEST, render_report, report
from launcher.sweep_space import variant_name
from launcher.topology import Topology

# Set by the sweep for each variant, or shared by the whole job array: not sweepable.
FIXED = ("run.name", "run.output_dir", "run.resume", "run.consolidate")


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


def validate(sweep: Sweep, topo: Topology | None) -> list[pipeline.Run]:
    """Every variant through the gate, as launch and submit would run it, before anything runs (topo None: the
    Slurm job's ranks)."""
    resolved = []
    for variant in sweep.variants:
        try:
            resolved.append(pipeline.prepare(sweep.recipe, sweep.overrides(variant), topo))
        except RecipeError as err:
            raise RecipeError(f"sweep variant {variant.name}: {err}") from None
    return resolved


# --- the two ways to run a sweep, as the CLI calls them ---------------------------------------------------------

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
        for variant, run in zip(sweep.variants, resolved, strict=True):
            swept = " ".join(f"--{k}={v}" for k, v in variant.overrides.items())
            print(f"{variant.name}: {swept}: {shlex.join(['launcher', *launch_command(run, flags)[3:]])}")
        return 0
    failed = run_local(sweep, resolved, flags)
    print(render_report(report(str(sweep.directory))), flush=True)
    return failed


def on_slurm(recipe: str, overrides: dict[str, Any], points: list, spec: dict, flags: dict[str, Any],
             max_parallel: Any, dry_run: bool) -> None:
    """Validate every variant for the job's ranks, then submit one job array, a task per variant."""
    overrides = {**overrides, **{f"slurm.{k}": v for k, v in flags.items() if v is not None}}
    sweep = build(recipe, overrides, points, spec)
    submit(sweep, validate(sweep, None), max_parallel, dry_run)


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

def launch_command(run: pipeline.Run, flags: list[str]) -> list[str]:
    """A variant starts as any run does: `launch` of its resolved recipe, written into its run directory."""
    return [sys.executable, "-m", "launcher", "launch", str(run.run_dir / "recipe.yaml"), *flags]


def run_local(sweep: Sweep, resolved: list[pipeline.Run], flags: list[str]) -> int:
    """Train the variants in turn, past failures; returns how many failed."""
    data = open_manifest(sweep)
    write_manifest(sweep.directory, data)
    total = len(sweep.variants)
    print(f"sweep {sweep.directory}: {total} variants", flush=True)
    for i, (variant, run, entry) in enumerate(zip(sweep.variants, resolved, data["variants"], strict=True), 1):
        if run.finished:
            print(f"[{i}/{total}] {variant.name}: already trained to the end; skipped", flush=True)
            entry["exit_code"] = 0
            continue
        rundir.prepare(run.run_dir, run.plan.snapshot())
        command = launch_command(run, flags)
        print(f"[{i}/{total}] {variant.name}: {shlex.join(['launcher', *command[3:]])}", flush=True)
        entry["exit_code"] = subprocess.run(command).returncode
        write_manifest(sweep.directory, data)
        if entry["exit_code"] != 0:
            print(f"[{i}/{total}] {variant.name}: failed (exit code {entry['exit_code']}); going on with the next",
                  file=sys.stderr, flush=True)
    write_manifest(sweep.directory, data)
    return sum(1 for entry in data["variants"] if entry["exit_code"] != 0)


# --- running: one Slurm job array ------------------------------------------------------------------------------

def submit(sweep: Sweep, resolved: list[pipeline.Run], max_parallel: Any, dry_run: bool) -> None:
    from launcher import slurm

    if max_parallel is not None and (isinstance(max_parallel, bool) or not isinstance(max_parallel, int)
                                     or max_parallel < 1):
        raise RecipeError(f"command line: --max_parallel must be an integer >= 1, got {max_parallel!r}")
    data = open_manifest(sweep)
    pending = [i for i, run in enumerate(resolved) if not run.finished]
    first = resolved[0]
    gpus = slurm.cluster_has_gpus()
    script = slurm.render(sweep.directory, sweep.name, first.recipe.slurm, first.recipe.run.consolidate, gpus,
                          array=[sweep.variants[i].run_dir for i in pending], max_parallel=max_parallel)
    tasks = "\n".join(f"task {t}: {sweep.variants[i].name} -> {sweep.variants[i].run_dir}"
                      for t, i in enumerate(pending))
    header = (f"sweep {sweep.directory}: {len(sweep.variants)} variants, {len(pending)} to train\n"
              f"{first.plan.batch}\n{first.plan.topology} per variant ({'GPU' if gpus else 'CPU'} ranks)\n"
              f"log: {slurm.log_pattern(sweep.directory, array=True)}\n{tasks}")
    if dry_run:
        print(f"{header}\n--- {sweep.directory / slurm.SCRIPT} (dry run: nothing written, nothing submitted)\n"
              f"{script}" if pending else header)
        return
    if not pending:
        print(f"{header}\nevery variant is already trained to the end; nothing to submit", flush=True)
        return
    slurm.refuse_active_job(sweep.directory)
    for i in pending:
        pipeline.write(resolved[i], resolved[i].plan.snapshot())
    (sweep.directory / "logs").mkdir(parents=True, exist_ok=True)
    rundir.write_atomic(sweep.directory / slurm.SCRIPT, script)
    write_manifest(sweep.directory, data)
    job = slurm.sbatch(sweep.directory / slurm.SCRIPT)
    for task, i in enumerate(pending):
        data["variants"][i]["job"] = f"{job}_{task}"
    write_manifest(sweep.directory, data)
    at_most = f", at most {max_parallel} at a time" if max_parallel else ""
    log = slurm.job_log(sweep.directory, sweep.name, job, array=True)
    print(f"{header}\nsubmitted job array {job} ({len(pending)} tasks{at_most})\nlog: {log}\n"
          f"report: launcher sweep_report {sweep.directory}", flush=True)
