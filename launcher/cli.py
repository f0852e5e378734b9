"""The `launcher` command (python-fire). Kept light: --help and plan import neither torch nor deepspeed.

Every command takes a recipe and dotted overrides, which win over the recipe: --training.learning_rate=1e-5.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from launcher import console, pipeline, topology, weights
from launcher import plan as plans
from launcher import recipe as recipes
from launcher.errors import EXIT_BAD_INPUT, RecipeError, exits_cleanly
from launcher.schema import did_you_mean


def _split(overrides: dict, command) -> dict:
    """Dotted keys are recipe overrides; anything else is a flag `command` does not have."""
    if "resume" in overrides:  # --resume auto|never|PATH: the common spelling of --run.resume
        overrides = {**{k: v for k, v in overrides.items() if k != "resume"}, "run.resume": str(overrides["resume"])}
    for key in overrides:
        if not recipes.is_override(key):
            known = (*inspect.signature(command).parameters, "resume", *recipes.TOP_LEVEL)
            raise RecipeError(f"command line: unknown option --{key}{did_you_mean(key, known)}; "
                              "recipe overrides look like --section.key=value")
    return overrides


@exits_cleanly
def plan(recipe: str, nproc_per_node: int | None = None, nnodes: int = 1, node_rank: int = 0,
         master_addr: str | None = None, master_port: int = topology.DEFAULT_PORT, hostfile: str | None = None,
         format: str = "text", **overrides) -> None:
    """Validate RECIPE and print what a launch would run: recipe, DeepSpeed JSON, batch, memory, command."""
    topo = topology.from_flags(nproc_per_node, nnodes, node_rank, master_addr, master_port, hostfile)
    resolved = plans.make(recipe, _split(overrides, plan), topo)
    if format not in ("text", "json"):
        raise RecipeError(f"command line: --format is {format!r}; use text or json")
    print(json.dumps(plans.as_json(resolved), indent=2) if format == "json" else plans.render(resolved))


@exits_cleanly
def launch(recipe: str, nproc_per_node: int | None = None, nnodes: int = 1, node_rank: int = 0,
           master_addr: str | None = None, master_port: int = topology.DEFAULT_PORT, hostfile: str | None = None,
           dry_run: bool = False, tiny: bool = False, verbose: bool = False, **overrides) -> None:
    """Start this node's ranks with the real `deepspeed` launcher (multi-node: --nnodes/--node_rank/--master_addr,
    no ssh needed; or --hostfile for DeepSpeed's own ssh start-up). --dry_run [--tiny]: the dry run of `train`,
    in this one process, planned for this launch's ranks; nothing is started. The console shows one progress bar,
    a line per evaluation and the summary; everything the ranks print is in <run dir>/logs/launch-node<N>.log.
    --verbose: DeepSpeed's INFO lines and every logged dict on the console too."""
    if verbose:  # read by the ranks (forwarded over ssh: a LAUNCHER_ variable)
        os.environ[console.VERBOSE] = "1"
    topo = topology.from_flags(nproc_per_node, nnodes, node_rank, master_addr, master_port, hostfile)
    if tiny and not dry_run:
        raise RecipeError("command line: --tiny goes with --dry_run")
    if dry_run:
        return train(recipe, dry_run=dry_run, tiny=tiny, nproc_per_node=topo.slots[0], nnodes=topo.nnodes, **overrides)
    topology.check_rendezvous(topo)
    run = pipeline.prepare(recipe, _split(overrides, launch), topo)
    if run.finished:
        print(run.status(), flush=True)
        return
    from launcher.slurm import refuse_active_job

    refuse_active_job(run.run_dir)  # a live Slurm job trains into it (this launch's own job excepted)
    pipeline.write(run, run.plan.files(), first_node=topo.node_rank == 0)
    plan = run.plan
    print(f"run directory {run.run_dir}\n{plan.batch}\n{topo}\n{run.status()}", flush=True)
    if topo.node_rank == 0 and (fetched := weights.describe(run.recipe)):
        print(fetched, flush=True)
    print(topology.shell_line(plan.env, plan.command), flush=True)
    if topo.hostfile and (left := topology.forwarded(dict(os.environ))[1]):
        print(f"not passed to the hosts over ssh: {', '.join(left)} (secrets, or values a shell would expand); "
              "the ranks use the hosts' own (~/.netrc from `wandb login`, the HF token file)", flush=True)
    if run.universal:  # resuming on another number of ranks: the first node converts the checkpoint, once
        from launcher import universal

        universal.convert(run.resume) if topo.node_rank == 0 else universal.wait_for(run.resume)
    if run.recipe.task == "sft":  # here, once, so that no rank waits at a barrier while another tokenizes
        from launcher import tokenized

        tokenized.preprocess(run, recipe, required=False)
    env = {**os.environ, **plan.env}
    if topology.VISIBLE in env:  # else DeepSpeed ignores it with a warning; the ranks get it back (visible_devices)
        env.pop("CUDA_VISIBLE_DEVICES", None)
    log = run.run_dir / "logs" / f"launch-node{topo.node_rank}.log"
    code, stopped = _run_ranks(plan.command, env, log, verbose, topology.shell_line(plan.env, plan.command))
    final = run.run_dir / "final"
    if code not in (0, EXIT_BAD_INPUT) and not stopped:  # bad input: the rank's own line says it all
        print(f"error: training failed (deepspeed exit code {code}); the failing rank's error is above (all of "
              f"it: {log}); the same command continues the run from its newest complete checkpoint",
              file=sys.stderr, flush=True)
    elif code == 0 and topo.node_rank == 0:
        print(f"finished: {final if final.is_dir() else run.run_dir}", flush=True)
    sys.exit(code)


def _run_ranks(command: list[str], env: dict[str, str], log: Path, verbose: bool, shown: str) -> tuple[int, bool]:
    """DeepSpeed's runner in a process group of its own, which SIGINT or SIGTERM to `launch` (Ctrl-C, a scheduler,
    kill) is passed on to: the runner, its per-node launcher and every rank stop, none is left orphaned. Passed on
    as SIGTERM, which ranks die of quietly (SIGINT makes each print a KeyboardInterrupt traceback). All it prints
    goes to LOG, and to the console less DeepSpeed's INFO lines unless VERBOSE (launcher/console.py). Returns the
    exit code (128 + N when stopped by signal N) and whether a signal stopped it."""
    if sys.stdout.isatty() and "COLUMNS" not in env:  # the ranks' progress bar then fits this terminal (tqdm)
        env = {**env, "COLUMNS": str(shutil.get_terminal_size().columns)}
    tee = console.Tee(log, verbose)
    tee.write_log(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shown}\n")
    try:
        return _wait(tee.popen(command, env=env, start_new_session=True))
    finally:
        tee.close()


def _wait(child: subprocess.Popen) -> tuple[int, bool]:
    received: list[int] = []

    def forward(signum, frame):
        received.append(signum)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGTERM)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if not received:
        return code, False
    for _ in range(100):  # up to 10 s for ranks still saving or tearing down, then nothing is left running
        try:
            os.killpg(child.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
    print(f"launch: stopped by {signal.Signals(received[0]).name}; the ranks were stopped too", file=sys.stderr,
          flush=True)
    return 128 + received[0], True


@exits_cleanly
def submit(recipe: str, nodes: int | None = None, gpus_per_node: int | None = None, partition: str | None = None,
           time: str | None = None, account: str | None = None, qos: str | None = None, dry_run: bool = False,
           preflight: bool = False, tiny: bool = False, **overrides) -> None:
    """Submit RECIPE as a Slurm job (flags override the recipe's `slurm` section); --dry_run prints the job script
    and submits nothing. The job resumes from the run's newest complete checkpoint and requeues itself on USR1.
    --preflight [--tiny]: first the dry run of `train` here, for the job's ranks; nothing is submitted if it fails."""
    from launcher import slurm

    if tiny and not preflight:
        raise RecipeError("command line: --tiny goes with --preflight")
    flags = {"nodes": nodes, "gpus_per_node": gpus_per_node, "partition": partition, "time": time,
             "account": account, "qos": qos}
    overrides = {**_split(overrides, submit), **{f"slurm.{k}": v for k, v in flags.items() if v is not None}}
    run = pipeline.prepare(recipe, overrides, None, check_data=not preflight)  # the dry run loads the data
    if run.finished and not dry_run:  # before minutes of --preflight that could only end in "nothing to submit"
        print(run.status().replace("nothing to do", "nothing to submit"), flush=True)
        return
    if preflight:  # the dry run swaps flash-attention and QLoRA for what runs on its CPU: the packages first
        from launcher import preflight as checks

        checks.check_packages(run.recipe, recipe)
        train(recipe, dry_run=preflight, tiny=tiny, **overrides)  # exits non-zero, naming the stage, if one fails
    run_dir, rec, gpus = run.run_dir, run.recipe, slurm.cluster_has_gpus()
    script = slurm.render(run_dir, rec.run.name, rec.slurm, rec.run.consolidate, gpus, where=recipe)
    header = (f"run directory {run_dir}\n{run.plan.batch}\n{run.plan.topology} ({'GPU' if gpus else 'CPU'} ranks)\n"
              f"memory: {run.plan.memory}\n{run.status()}\nlog: {slurm.log_pattern(run_dir)}"
              + (f"\n{fetched}" if (fetched := weights.describe(rec)) else ""))
    if dry_run:
        print(f"{header}\n--- {run_dir / slurm.SCRIPT} (dry run: nothing written, nothing submitted)\n{script}")
        return
    slurm.refuse_active_job(run_dir)
    pipeline.write(run, {**run.plan.snapshot(), slurm.SCRIPT: script})
    print(header, flush=True)
    if rec.task == "sft":  # here, before the queue: the job's GPUs then never wait while it tokenizes
        from launcher import tokenized

        tokenized.preprocess(run, recipe, required=False)
    (run_dir / "logs").mkdir(exist_ok=True)
    job = slurm.sbatch(run_dir / slurm.SCRIPT)
    print(f"submitted job {job}\nlog: {slurm.job_log(run_dir, rec.run.name, job)}", flush=True)


@exits_cleanly
def preprocess(recipe: str, **overrides) -> None:
    """Tokenize (and pack) RECIPE's data once, here, into the cache its ranks load it from. The cache is
    data.cache_dir (default <parent of the run directory>/tokenized), addressed by the rows, tokenizer and token
    settings: a later start, requeue or sweep variant with the same ones finds it there. launch and submit do this
    themselves before any rank starts; run it as a step of its own on a CPU node for big data. Task sft only:
    classification and regression tokenize in their trainer."""
    from launcher import tokenized

    def ranks(r):  # the run's ranks as its recipe says (the batch check needs some); they do not change the tokens
        return topology.Topology((int(r.slurm.gpus_per_node or 1),) * (r.slurm.nodes if r.slurm.gpus_per_node else 1))

    run = pipeline.prepare(recipe, _split(overrides, preprocess), ranks)
    if run.finished:
        print(run.status().replace("nothing to do", "nothing to tokenize"), flush=True)
        return
    tokenized.preprocess(run, recipe)


@exits_cleanly
def train(recipe: str, dry_run: bool = False, tiny: bool = False, nproc_per_node: int | None = None,
          nnodes: int | None = None, verbose: bool = False, **overrides) -> None:
    """Train in this process as a single rank: the quick debug run of a recipe on one GPU or the CPU.

    --dry_run: 3 steps on 64 rows into a throwaway run directory, then consolidate, reload and generate; prints a
    report, one line per stage, and fails naming the stage. --tiny (with --dry_run): the same architecture at a toy
    size, random weights: no download of the model, no GPU needed. --nproc_per_node/--nnodes: the real run's ranks,
    for the dry run's batch check and memory estimate (default: the recipe's slurm section, else 1 x 1).
    --verbose: every logged dict printed, as HF's trainer does, not just the progress bar and a line per evaluation."""
    if verbose:
        os.environ[console.VERBOSE] = "1"
    if (tiny or nproc_per_node or nnodes) and not dry_run:
        raise RecipeError("command line: --tiny, --nproc_per_node and --nnodes go with --dry_run")
    if dry_run:
        from launcher import dry_run as dry

        dry.run(recipe, _split(overrides, train), bool(tiny), nproc_per_node, nnodes)
        return
    from launcher import train as worker

    worker.run(recipe, _split(overrides, train))


@exits_cleanly
def consolidate(checkpoint: str, output: str, dtype: str | None = None, max_shard_size: str = "5GB",
                base_model: str | None = None, overwrite: bool = False) -> None:
    """Merge a ZeRO checkpoint (checkpoint-N/, a DeepSpeed dir, or a run directory's newest) and any LoRA adapter
    into one Hugging Face model directory: safetensors shards, config, generation config, tokenizer, model card."""
    from launcher import consolidate as consolidation

    consolidation.consolidate(str(checkpoint), str(output), dtype, str(max_shard_size), base_model, bool(overwrite))


@exits_cleanly
def evaluate(model_dir: str, data: str, split: str = "train", output: str | None = None, batch_size: int = 32,
             max_rows: int | None = None, prompts: int = 3) -> None:
    """Metrics of a consolidated model (MODEL_DIR, e.g. <run dir>/final) on --data FILE (or a hub id, --split):
    classifiers: loss, accuracy, macro precision/recall/F1 (regression: MSE, MAE); language models: loss,
    perplexity, and greedy answers to every row scored against its reference (exact match, token F1), --prompts of
    them shown. Printed, and written as JSON (--output; default MODEL_DIR/metrics-<data name>.json)."""
    from launcher import evaluate as evaluation

    evaluation.evaluate(str(model_dir), str(data), str(split), output, int(batch_size), max_rows, int(prompts))


@exits_cleanly
def sweep(recipe: str, grid: str | None = None, random: int | None = None, space: str | None = None, seed: int = 0,
          nproc_per_node: int | None = None, master_port: int | None = None, slurm: bool = False,
          nodes: int | None = None, gpus_per_node: int | None = None, partition: str | None = None,
          time: str | None = None, account: str | None = None, qos: str | None = None,
          max_parallel: int | None = None, dry_run: bool = False, **overrides) -> None:
    """Train variants of RECIPE, each in its own run directory under <run dir>-sweep/, all validated before any
    starts. --grid 'training.learning_rate=[1e-5,3e-5] lora.r=[8,16]': every combination. --random N --space
    'training.learning_rate=loguniform(1e-5,1e-3) lora.r=choice(8,16) training.weight_decay=uniform(0,0.1)'
    [--seed S]: N seeded draws. Here: one after another with `launch` [--nproc_per_node G --master_port P], then the
    report; the same command resumes the sweep. --slurm: one job array, a task per variant ([--nodes N
    --gpus_per_node G ...] as for submit, [--max_parallel K]). --dry_run: print what would run (with --slurm, the job
    script); nothing is written."""
    from launcher import sweep as sweeps
    from launcher import sweep_space

    overrides = _split(overrides, sweep)
    points, spec = sweep_space.points_from_flags(grid, random, space, seed)
    flags = {"nodes": nodes, "gpus_per_node": gpus_per_node, "partition": partition, "time": time,
             "account": account, "qos": qos}
    if slurm:
        if nproc_per_node is not None or master_port is not None:
            raise RecipeError("command line: --nproc_per_node and --master_port are for sweeps here; a Slurm sweep "
                              "takes --gpus_per_node (ranks per node) and picks its ports itself")
        sweeps.on_slurm(recipe, overrides, points, spec, flags, max_parallel, bool(dry_run))
        return
    given = [f"--{k}" for k, v in {**flags, "max_parallel": max_parallel}.items() if v is not None]
    if given:
        raise RecipeError(f"command line: {', '.join(given)} {'go' if len(given) > 1 else 'goes'} with --slurm")
    failed = sweeps.here(recipe, overrides, points, spec, nproc_per_node, master_port, bool(dry_run))
    sys.exit(1 if failed else 0)


@exits_cleanly
def sweep_report(sweep_dir: str, metric: str | None = None, format: str = "text") -> None:
    """The variants of a sweep (SWEEP_DIR: the <run dir>-sweep directory), best first by --metric (default
    eval_loss, else the training loss; lower is better for names with "loss", higher otherwise): their overrides,
    steps, final training loss, final eval metrics, status. Failed and unrun variants come last."""
    from launcher import sweep_report as reports

    if format not in ("text", "json"):
        raise RecipeError(f"command line: --format is {format!r}; use text or json")
    result = reports.report(str(sweep_dir), None if metric is None else str(metric))
    print(json.dumps(result, indent=2) if format == "json" else reports.render_report(result))


@exits_cleanly
def keys(section: str | None = None) -> None:
    """List the recipe's keys (of SECTION only, if given: lora, training, ...), one line each: dotted name, type,
    default, doc. `training` lists TRL's SFTConfig arguments with their defaults."""
    from launcher import cli_help

    print(cli_help.keys(section))


COMMANDS = {"plan": plan, "launch": launch, "submit": submit, "preprocess": preprocess, "train": train,
            "consolidate": consolidate, "evaluate": evaluate, "sweep": sweep, "sweep_report": sweep_report,
            "keys": keys}


def main() -> None:
    from launcher import cli_help

    text = cli_help.requested(sys.argv[1:], COMMANDS)
    if text is not None:  # fire's own help exits 2 with an INFO line for commands taking **overrides
        print(text)
        sys.exit(0)
    import fire

    fire.Fire(COMMANDS, name="launcher")
