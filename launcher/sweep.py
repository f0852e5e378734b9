"""`sweep`: one recipe, many variants (sweep_space.py), each trained into its own run directory under <run dir>-sweep/,
one after another here or as one Slurm job array. Every variant is planned (and its data checked) before the first
starts or anything is queued, so a typo in the grid costs one line, not half a sweep. `sweep.json` in the sweep
directory records the variants: the same command again resumes the sweep, a different sweep there is refused.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher import pipeline, rundir, slurm, topology
from launcher import recipe as recipes
from launcher.errors import RecipeError
from launcher.sweep_report import MANIFEST, load_manifest, render_report, report
from launcher.sweep_space import variant_name


@dataclass
class Variant:
    name: str  # also the name of its run directory, in the sweep directory
    overrides: dict[str, Any]  # the swept keys only


@dataclass
class Sweep:
    recipe: str
    common: dict[str, Any]  # command-line overrides, for every variant
    directory: Path
    run_name: str  # the recipe's
    wandb: bool  # the recipe has a wandb section
    variants: list[Variant]
    spec: dict[str, Any]  # how the variants were made, for the manifest

    @property
    def name(self) -> str:  # the W&B group and the Slurm job name
        return f"{self.run_name}-sweep"

    def overrides(self, variant: Variant) -> dict[str, Any]:
        out = {**self.common, **variant.overrides, "run.output_dir": str(self.directory / variant.name),
               "run.name": f"{self.run_name}-{variant.name}"}
        if (self.wandb or any(k.startswith("wandb.") for k in variant.overrides)) and "wandb.group" not in out:
            out["wandb.group"] = self.name
        return out


def build(recipe: str, common: dict[str, Any], points: list[dict[str, Any]], spec: dict[str, Any]) -> Sweep:
    for key in points[0]:
        if key in ("run.name", "run.output_dir", "run.resume", "run.consolidate") or key.startswith("slurm."):
            raise RecipeError(f"command line: {key} cannot be swept: the sweep sets run.name and run.output_dir per "
                              "variant, and run.resume, run.consolidate and slurm.* are shared by all")
        if key in common:
            raise RecipeError(f"command line: {key} is both swept and set with --{key}; drop one")
    base = recipes.load(recipe, common)
    width = max(2, len(str(len(points) - 1)))
    return Sweep(recipe, common, Path(f"{base.run.output_dir}-sweep"), base.run.name, base.wandb is not None,
                 [Variant(variant_name(index, width, point), point) for index, point in enumerate(points)], spec)


def validate(sweep: Sweep, topo: topology.Topology | None) -> list[pipeline.Run]:
    """Every variant through the gate, as launch and submit would run it (topo None: the Slurm job's ranks)."""
    resolved = []
    for variant in sweep.variants:
        try:
            resolved.append(pipeline.prepare(sweep.recipe, sweep.overrides(variant), topo))
        except RecipeError as err:
            raise RecipeError(f"sweep variant {variant.name}: {err}") from None
    return resolved


def here(recipe: str, overrides: dict[str, Any], points: list, spec: dict, nproc_per_node: Any, master_port: Any,
         dry_run: bool) -> int:
    """Validate every variant, then train them in turn on this machine, past failures; returns how many failed."""
    port = topology.DEFAULT_PORT if master_port is None else master_port
    topo = topology.from_flags(nproc_per_node, master_port=port)
    flags = [*(["--nproc_per_node", str(nproc_per_node)] if nproc_per_node is not None else []),
             *(["--master_port", str(master_port)] if master_port is not None else [])]
    sweep = build(recipe, overrides, points, spec)
    resolved = validate(sweep, topo)
    data = open_manifest(sweep)  # refuses another sweep's directory before anything is written
    if not dry_run:
        write_manifest(sweep.directory, data)
    print(f"sweep {sweep.directory}: {len(sweep.variants)} variants"
          + (f", {topo} each (dry run: nothing written, nothing run)" if dry_run else ""), flush=True)
    for i, (variant, run, entry) in enumerate(zip(sweep.variants, resolved, data["variants"], strict=True), 1):
        # a variant starts as any run does: `launch` of its resolved recipe, written into its run directory
        args, at = ["launch", str(run.run_dir / "recipe.yaml"), *flags], f"[{i}/{len(resolved)}] {variant.name}"
        if dry_run:
            swept = " ".join(f"--{k}={v}" for k, v in variant.overrides.items())
            print(f"{variant.name}: {swept}: {shlex.join(['launcher', *args])}")
        elif run.finished:
            print(f"{at}: already trained to the end; skipped", flush=True)
            entry["exit_code"] = 0
        else:
            rundir.prepare(run.run_dir, run.plan.snapshot())
            print(f"{at}: {shlex.join(['launcher', *args])}", flush=True)
            entry["exit_code"] = subprocess.run([sys.executable, "-m", "launcher", *args]).returncode
            write_manifest(sweep.directory, data)
            if entry["exit_code"] != 0:
                print(f"{at}: failed (exit code {entry['exit_code']}); going on with the next", file=sys.stderr,
                      flush=True)
    if dry_run:
        return 0
    write_manifest(sweep.directory, data)
    print(render_report(report(str(sweep.directory))), flush=True)
    return sum(entry["exit_code"] != 0 for entry in data["variants"])


def on_slurm(recipe: str, overrides: dict[str, Any], points: list, spec: dict, flags: dict[str, Any],
             max_parallel: Any, dry_run: bool) -> None:
    """Validate every variant for the job's ranks, then submit one job array, a task per variant."""
    sweep = build(recipe, {**overrides, **{f"slurm.{k}": v for k, v in flags.items() if v is not None}}, points, spec)
    resolved = validate(sweep, None)
    if max_parallel is not None:
        topology._positive("--max_parallel", max_parallel)  # the launch flags' check and message
    data = open_manifest(sweep)
    pending = [i for i, run in enumerate(resolved) if not run.finished]
    first, gpus = resolved[0], slurm.cluster_has_gpus()
    script = slurm.render(sweep.directory, sweep.name, first.recipe.slurm, first.recipe.run.consolidate, gpus,
                          array=[resolved[i].run_dir for i in pending], max_parallel=max_parallel,
                          where=recipe)
    tasks = "\n".join(f"task {t}: {sweep.variants[i].name} -> {resolved[i].run_dir}" for t, i in enumerate(pending))
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
    print(f"{header}\nsubmitted job array {job} ({len(pending)} tasks{at_most})\n"
          f"log: {slurm.job_log(sweep.directory, sweep.name, job, array=True)}\n"
          f"report: launcher sweep_report {sweep.directory}", flush=True)


def open_manifest(sweep: Sweep) -> dict[str, Any]:
    """This sweep's manifest, carrying over what an earlier run of the same sweep recorded; refuses another sweep's
    directory, whose run directories this one would mix with its own."""
    data = {"name": sweep.name, "recipe": str(Path(sweep.recipe).absolute()), **sweep.spec, "overrides": sweep.common,
            "variants": [{"name": v.name, "overrides": v.overrides, "run_dir": str(sweep.directory / v.name)}
                         for v in sweep.variants]}
    data, path = json.loads(json.dumps(data)), sweep.directory / MANIFEST  # as it will read back: tuples are lists
    if not path.is_file():
        return data
    old = load_manifest(str(path), "; move it away to start this sweep afresh")[1]
    was, now = ((d.get("overrides"), [(v["name"], v["overrides"]) for v in d.get("variants", [])]) for d in (old, data))
    if was != now:
        why = (f"its overrides were {was[0]}, now {now[0]}" if was[0] != now[0] else
               f"its variants are {', '.join(n for n, _ in was[1])}; now {', '.join(n for n, _ in now[1])}")
        raise RecipeError(f"{path}: this directory holds a different sweep ({why}); run that sweep's own command to "
                          "resume it, or pick another --run.output_dir or --run.name")
    for before, entry in zip(old["variants"], data["variants"], strict=True):
        entry.update({k: before[k] for k in ("exit_code", "job") if k in before})
    return data


def write_manifest(directory: Path, data: dict[str, Any]) -> None:
    rundir.write_atomic(directory / MANIFEST, json.dumps(data, indent=2) + "\n")
