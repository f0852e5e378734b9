"""`launcher train RECIPE --dry_run [--tiny]`: every stage of a real run, in minutes, before the queue.

The recipe's model, data and configs, but 3 steps on the first 64 rows, into a throwaway run directory
(<output_dir>-dryrun-<time>); then the checkpoint is consolidated, reloaded and asked to generate. Prints one line
per stage, PASS or FAIL with the number that matters, and exits non-zero naming the first stage that failed.
--tiny swaps in the same architecture at a toy size (launcher/tiny.py): no weights, no GPU needed.
"""

from __future__ import annotations

import copy
import math
import sys
import time
import warnings
from pathlib import Path

from launcher import assets, checkpoints, ds_config, modeling, packing, pipeline, preflight, rundir, tiny
from launcher import recipe as recipes
from launcher import train as worker
from launcher.dry_run_report import (
    Report,
    StageFailed,
    generate,
    inspect_head,
    inspect_packing,
    inspect_sft,
    measured_memory,
    predict,
)
from launcher.errors import EXIT_BAD_INPUT, RecipeError
from launcher.topology import Topology

STEPS = 3
ROWS = 64
EVAL_ROWS = 16
CPU_MICRO_BATCH = 2


def run(recipe_path: str, overrides: dict, use_tiny: bool, nproc_per_node: int | None = None,
        nnodes: int | None = None) -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)
    _, world = worker.distributed_env()
    if world != 1:
        raise RecipeError(f"--dry_run runs as one process; this one was started as one of {world} ranks")
    report = Report()
    started = time.time()
    try:
        built, planned, dry, run_dir = build(recipe_path, overrides, use_tiny, (nproc_per_node, nnodes), report)
        trainer = built.trainer  # a few steps, the last one saving a checkpoint; then the run's end product
        with report.stage("train"):
            trainer.train()
            metrics = trainer.evaluate() if built.eval_set is not None else {}
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        if trainer.state.global_step != STEPS or not losses or not all(math.isfinite(x) for x in losses):
            report.fail("train", f"{trainer.state.global_step} steps, losses {losses}: expected {STEPS} finite")
        evaluated = f", eval loss {metrics['eval_loss']:.3f}" if "eval_loss" in metrics else ""
        report.add("train", f"{STEPS} steps, loss {' -> '.join(f'{x:.3f}' for x in losses)}{evaluated}")
        report.add("memory", f"measured {measured_memory()}; real run estimate: {planned.memory}")
        done = checkpoints.complete(run_dir)
        if not done:
            report.fail("checkpoint", f"no checkpoint with the {checkpoints.MARKER} marker under {run_dir}")
        report.add("checkpoint", f"{done[-1]} ({checkpoints.MARKER} written)")
        with report.stage("consolidate"):
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            from launcher.consolidate import consolidate

            unset_hf_deepspeed_config()
            final = consolidate(str(run_dir), str(run_dir / "final"), overwrite=True, progress=lambda _: None)
        size = sum(f.stat().st_size for f in final.glob("*.safetensors"))
        report.add("consolidate", f"{final} ({size / 1e6:.1f} MB)")
        with report.stage("reload"):  # with the task's Auto class; then it answers the first row
            from transformers import AutoTokenizer

            reloaded = modeling.auto_class(dry.task).from_pretrained(final)
            final_tokenizer = AutoTokenizer.from_pretrained(final)
        labels = f", labels {list(reloaded.config.id2label.values())}" if dry.task == "classification" else ""
        report.add("reload", f"{type(reloaded).__name__}, {modeling.parameter_count(reloaded):,} params{labels}")
        stage = "generate" if dry.task == "sft" else "predict"
        with report.stage(stage):
            answer = (generate(reloaded, final_tokenizer, built.train_set[0]) if dry.task == "sft"
                      else predict(reloaded, final_tokenizer, built.train_set[0], dry.task))
        report.add(stage, answer)
    except StageFailed as err:
        report.add(err.stage, err.message, ok=False)
        print(report.render(), flush=True)
        print(f"error: dry run failed at stage '{err.stage}': {err.message}", file=sys.stderr, flush=True)
        sys.exit(EXIT_BAD_INPUT if err.bad_input else 1)
    print(report.render() + f"\ndry run passed in {time.time() - started:.0f} s", flush=True)


def build(recipe_path: str, overrides: dict, use_tiny: bool, ranks: tuple, report: Report):
    """The gate for the real run's ranks, the recipe shrunk, then the worker's own `build` on it, and what it built
    inspected. Returns (built, the real run's plan, the shrunk recipe, the throwaway run directory)."""
    # --- the gate, exactly as `launch` or `submit` runs it for the real run's topology (the data: stages below).
    # Its ranks, for the batch check and memory estimate: the flags, else the recipe's slurm section, else one rank.
    per_node, nodes = ranks
    topology = lambda r: Topology((int(per_node or r.slurm.gpus_per_node or 1),)
                                  * int(nodes or (r.slurm.nodes if r.slurm.gpus_per_node else 1)))
    with report.stage("recipe valid"):
        gate = pipeline.prepare(recipe_path, overrides, topology, False)
    planned, recipe = gate.plan, gate.recipe
    report.add("recipe valid", f"{recipe_path}; real run: {planned.batch} on {planned.topology}")
    if gate.resume or gate.finished:
        report.note(f"real run: {gate.status()}")
    if any(k.startswith("data.") for k in overrides):
        report.note("data from the command line: " + ", ".join(f"--{k}={v}" for k, v in overrides.items()
                                                                 if k.startswith("data.")))

    import torch

    dry = copy.deepcopy(recipe)
    run_dir = Path(f"{recipe.run.output_dir}-dryrun-{time.strftime('%Y%m%d-%H%M%S')}")
    dry.run.output_dir, dry.run.resume, dry.run.global_batch_size, dry.wandb = str(run_dir), "never", None, None
    dry.training.update(SHRUNK)
    report.note(f"dry run: {STEPS} steps on the first {ROWS} rows, gradient accumulation 1, a checkpoint at step "
                f"{STEPS}, one evaluation on {EVAL_ROWS} rows at the end; run directory {run_dir}")
    for change in [] if torch.cuda.is_available() else cpu_fallbacks(dry, recipe_path):
        report.note(change)
    changed = sorted(k for k in dry.training.keys() | recipe.training.keys()
                     if dry.training.get(k, "unset") != recipe.training.get(k, "unset"))
    report.note(f"training arguments changed for the dry run: {', '.join(changed)}")
    if use_tiny:  # the recipe's architecture at a toy size, saved where the recipe's model was
        with report.stage("tiny model"):
            config = recipes.model_config(recipe, recipe_path)
            if config is None:
                raise RecipeError("--tiny needs the model's config.json: set model.config or use a local model")
            m = recipe.model
            params, tokenizer_note = tiny.write(config, m.tokenizer or m.name_or_path, run_dir / "tiny-model",
                                                trust_remote_code=m.trust_remote_code)
        dry.model.name_or_path = dry.model.tokenizer = str(run_dir / "tiny-model")
        dry.model.config, dry.model.init = None, "pretrained"
        report.add("tiny model", f"{config.get('architectures', ['?'])[0]}: 2 layers, hidden 64, vocab "
                   f"{config.get('vocab_size')}, {params / 1e6:.1f} M params (real: {planned.params or 0:,})")
        if tokenizer_note:
            report.note(tokenizer_note)

    for note in stand_in_data(dry):
        report.note(note)

    import datasets
    import transformers

    datasets.disable_progress_bars()  # the report is the output: no bars, no per-step log dicts
    transformers.utils.logging.disable_progress_bar()
    with report.stage("recipe valid"):  # the dry run's own changes must still make a valid run
        ds, _ = ds_config.resolve(dry, 1, recipes.model_config(dry, recipe_path), recipe_path)
    report.run_dir = run_dir
    rundir.prepare(run_dir, {"recipe.yaml": recipes.dump(dry), "ds_config.json": ds_config.to_json(ds)})

    # --- the worker's build, on the first rows
    counts = []

    def first_rows(train, evaluation):
        counts.extend([len(train), len(evaluation) if evaluation is not None else 0])
        cut = train.select(range(min(ROWS, len(train))))
        return cut, evaluation.select(range(min(EVAL_ROWS, len(evaluation)))) if evaluation is not None else None

    built = worker.build(dry, ds, recipe_path, 1, stage=report.stage, select=first_rows)
    report.add("dataset", f"{counts[0]:,} train rows" + (f", {counts[1]:,} eval rows" if counts[1] else "")
               + f"; the dry run uses the first {len(built.train_set)}"
               + (f" and {len(built.eval_set)}" if built.eval_set is not None else ""))
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    for printer in (PrinterCallback, ProgressCallback):
        built.trainer.remove_callback(printer)
    (inspect_sft if dry.task == "sft" else inspect_head)(report, dry, built)
    if dry.task == "sft" and packing.on(dry.training):
        with report.stage("packing"):
            inspect_packing(report, dry, built)
    return built, planned, dry, run_dir


# Hub datasets with an offline stand-in: a sample of the same shape (columns, turns, lengths), package data.
STAND_IN_DATA = {"HuggingFaceH4/ultrachat_200k": "ultrachat_sample.jsonl"}


def stand_in_data(dry) -> list[str]:
    """A hub dataset that is not in this machine's hub cache is read from its shipped stand-in sample, as the tokenizer
    is (launcher/tiny.py): a dry run checks the pipeline, not the rows, and must not wait on the network."""
    from huggingface_hub import constants

    notes = []
    for kind, specs in (("train", dry.data.train), ("eval", dry.data.eval)):
        for i, spec in enumerate(specs):
            cached = Path(constants.HF_HUB_CACHE) / f"datasets--{spec.path.replace('/', '--')}"
            if spec.path not in STAND_IN_DATA or Path(spec.path).expanduser().exists() or cached.is_dir():
                continue
            sample = assets.stand_ins() / STAND_IN_DATA[spec.path]
            notes.append(f"STAND-IN data for data.{kind}.{i} ({spec.path}, split {spec.split}, not on this machine): "
                         f"recipes/stand-ins/{sample.name}, a sample of its shape; the real run reads the hub's")
            spec.path, spec.split, spec.subset = str(sample), "train", None
    return notes


# The training arguments the dry run changes (besides the CPU fallbacks, which it reports one by one): a few steps,
# a checkpoint at the last, no evaluation during training, nothing reported. Everything else is the real run's.
SHRUNK = {"max_steps": STEPS, "save_steps": STEPS, "save_strategy": "steps", "logging_steps": 1, "eval_strategy": "no",
          "gradient_accumulation_steps": 1, "report_to": "none", "disable_tqdm": True, "save_total_limit": None}
# Arguments that follow from those (TrainingArguments derives do_eval from eval_strategy), from the throwaway run
# directory and from the dry run's one rank.
DERIVED = ("do_eval", "output_dir", "logging_dir", "deepspeed", "hf_deepspeed_config")


# Training options that run on GPUs only, switched off on a CPU (the real run keeps them).
GPU_ONLY = {"use_liger_kernel": "Liger's kernels are Triton GPU code",
            "activation_offloading": "it moves activations from GPU to CPU memory on CUDA streams"}


def cpu_fallbacks(dry, where: str) -> list[str]:
    """What cannot run on a CPU, replaced; each change is reported."""
    changes = []
    try:  # before flash-attention and QLoRA are swapped out below. A note, not a failure: a CPU machine may dry-run
        # a GPU recipe it will not run; `launch` and `submit` refuse it (their ranks run this Python)
        preflight.check_packages(dry, where)
    except RecipeError as err:
        changes.append(f"the real run needs a package this Python lacks, and launch and submit refuse it: {err}")
    if any(dry.training.get(key) for key in ("bf16", "fp16", "bf16_full_eval", "fp16_full_eval")):
        dry.training.update({key: False for key in ("bf16", "fp16", "bf16_full_eval", "fp16_full_eval")
                             if key in dry.training})
        changes.append("CPU: bf16/fp16 off (training in float32)")
    if dry.model.dtype in ("bfloat16", "float16"):
        changes.append(f"CPU: model.dtype {dry.model.dtype} -> float32")
        dry.model.dtype = "float32"
    if dry.model.attn_implementation and dry.model.attn_implementation.startswith("flash_attention"):
        changes.append(f"CPU: attn_implementation {dry.model.attn_implementation} -> sdpa")
        dry.model.attn_implementation = "sdpa"
    for key, why in GPU_ONLY.items():
        if dry.training.get(key):
            dry.training[key] = False
            changes.append(f"CPU: training.{key} off ({why})")
    micro = dry.training.get("per_device_train_batch_size", 8)
    if micro > CPU_MICRO_BATCH:  # a GPU's batch, on a CPU: minutes of logits over the whole vocabulary per step
        dry.training.update(per_device_train_batch_size=CPU_MICRO_BATCH, per_device_eval_batch_size=CPU_MICRO_BATCH)
        changes.append(f"CPU: per-device batch {micro} -> {CPU_MICRO_BATCH} (the real batch's memory is the GPU "
                       "estimate's business)")
    if dry.lora and dry.lora.quantize != "none":
        changes.append(f"CPU: lora.quantize {dry.lora.quantize} -> none (bitsandbytes needs CUDA)")
        dry.lora.quantize = "none"
    template = ds_config.merge(ds_config.load_template(dry.deepspeed.config), dry.deepspeed.overrides)
    zero = template.get("zero_optimization", {})
    offloaded = {key: {"device": "none"} for key in ("offload_optimizer", "offload_param")
                 if zero.get(key, {}).get("device", "none") != "none"}
    cpu = {"zero_optimization": offloaded} if offloaded else {}
    if offloaded:
        changes.append("CPU: ZeRO offload off (the weights are in CPU memory already; DeepSpeedCPUAdam would need "
                       "a C++ build)")
    if "optimizer" in template:
        cpu["optimizer"] = {"params": {"torch_adam": True}}
        changes.append("CPU: DeepSpeed's AdamW runs as torch.optim.AdamW (its fused kernels need a build)")
    dry.deepspeed.overrides = ds_config.merge(dry.deepspeed.overrides, cpu)
    return changes


