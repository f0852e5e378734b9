"""The one gate: every way of starting a run (launch, submit, sweep, the dry run, and each rank of the worker)
turns a recipe into a checked, planned run here, in one order, settled once:

    plan (schema, rules, DeepSpeed numbers) -> resume point -> same experiment? -> already finished?
    -> W&B credentials -> data and tokenizer (the launching process only) -> snapshot into the run directory
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launcher import checkpoints, ds_config, preflight, rundir, tracking
from launcher import plan as plans
from launcher import recipe as recipes
from launcher.errors import RecipeError
from launcher.plan import Plan
from launcher.topology import Topology

STOPPED = "stopped.json"  # written when a stop request ended training early: the job script requeues on it


@dataclass
class Run:
    plan: Plan
    resume: Path | None  # the checkpoint this start continues from
    finished: bool  # that checkpoint is the last step: nothing to train
    changes: list[str] = field(default_factory=list)  # keys changed since the run started, none identifying
    universal: bool = False  # resumes on another number of ranks: from the checkpoint's universal conversion

    @property
    def recipe(self):
        return self.plan.recipe

    @property
    def run_dir(self) -> Path:
        return self.plan.run_dir

    def status(self) -> str:  # what this start does, in one line
        if self.finished:
            return f"{self.run_dir}: already trained to the end ({self.resume.name}); nothing to do"
        start = f"resuming from {self.resume}" if self.resume else "new run"
        if self.universal:
            saved = checkpoints.marker(self.resume).get("world_size")
            start += (f" (saved by {saved} ranks; this run has {self.plan.topology.world}: from DeepSpeed's universal "
                      "format, converted first if not yet)")
        return start + (f"; changed since the run started: {', '.join(self.changes)}" if self.changes else "")


def prepare(recipe_path: str, overrides: dict[str, Any], topology: Topology | None, check_data: bool = True) -> Run:
    """The gate. check_data: load and check the data and tokenizer here (the ranks load them anyway)."""
    plan = plans.make(recipe_path, overrides, topology)
    recipe = plan.recipe
    requeued = int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0  # by Slurm: it always continues its own run
    resume = checkpoints.resume_point(plan.run_dir, recipe.run.resume, requeued)
    stage, saved = ds_config.zero_stage(plan.ds_config, ""), resume and checkpoints.marker(resume).get("zero_stage")
    if saved is not None and saved != stage:
        raise RecipeError(f"{resume}: saved under ZeRO-{saved}, and deepspeed.config is ZeRO-{stage} now; resume "
                          f"with a ZeRO-{saved} config (its shards are laid out per stage)")
    own = resume is not None and resume.parent == checkpoints.directory(plan.run_dir)
    universal = resume is not None and world_changed(resume, plan, stage, own)
    if universal:  # this start's ranks load DeepSpeed's universal conversion of the checkpoint (launcher/universal.py)
        plan.ds_config["checkpoint"] = {**plan.ds_config.get("checkpoint", {}), "load_universal": True}
    changes = rundir.changes_since_start(plan.run_dir, recipes.dump(recipe)) if own else []
    finished = resume is not None and checkpoints.finished(resume, ds_config.training_value(recipe, "max_steps"))
    if not finished:
        tracking.check_credentials(recipe, recipe_path)
        if check_data:
            preflight.check(recipe, recipe_path)
    return Run(plan, resume, finished, changes, universal and not finished)


def world_changed(resume: Path, plan: Plan, stage: int, own: bool) -> bool:
    """Whether this start continues on another number of ranks than saved RESUME. The global batch must be the one
    the checkpoint was trained at, whatever the world size: the step count, the learning-rate schedule and the data
    position are counted in its steps. Accumulation is derived again for the new world size (run.global_batch_size)."""
    info, world = checkpoints.marker(resume), plan.topology.world
    saved_world = info.get("world_size")
    saved_batch = info.get("global_batch") or (own and saved_world and _stored_batch(plan.run_dir, saved_world))
    if saved_batch and saved_batch != plan.batch.global_size:
        raise RecipeError(f"{resume}: trained at global batch {saved_batch} ({saved_world} ranks), and this start's "
                          f"is {plan.batch.global_size} ({plan.batch}); steps, schedule and data position count in "
                          f"the checkpoint's batches: set run.global_batch_size: {saved_batch}, which derives the "
                          "accumulation for any number of ranks")
    if saved_world is None or saved_world == world:
        return False
    if stage == 0:
        raise RecipeError(f"{resume}: saved by {saved_world} ranks without ZeRO, and this run has {world}; resume "
                          f"with {saved_world} ranks (another number of ranks is for ZeRO-1, 2 and 3 checkpoints)")
    return True


def _stored_batch(run_dir: Path, world: int) -> int | None:
    """The global batch of the recipe the run directory holds (before this start writes its own), at WORLD ranks."""
    import yaml

    try:
        training = yaml.safe_load((run_dir / "recipe.yaml").read_text())["training"]
        return int(training["per_device_train_batch_size"]) * int(training["gradient_accumulation_steps"]) * world
    except (OSError, KeyError, TypeError, ValueError):
        return None


def write(run: Run, files: dict[str, str], first_node: bool = True) -> None:
    """Snapshot what runs into the run directory (every node writes the same files, so its ranks find them); the
    first node also moves checkpoints cut short by an earlier crash out of the way and records the environment."""
    run_dir = run.run_dir
    if first_node:
        for moved in checkpoints.set_aside(run_dir):
            print(f"skipping incomplete checkpoint (no {checkpoints.MARKER}; moved to {moved})", flush=True)
        (run_dir / STOPPED).unlink(missing_ok=True)
    rundir.prepare(run_dir, files)
    if first_node:
        rundir.record_environment(run_dir)
