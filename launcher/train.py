"""The training worker: one rank of a run, in stages from recipe to saved checkpoint.

Started by the real launcher as `deepspeed ... --module launcher.train RECIPE [--section.key=value ...]` (what
`launcher launch` runs; you may run it yourself), or in-process as a single rank by `launcher train RECIPE`.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import traceback
import warnings
from pathlib import Path

from launcher import checkpoints, data, ds_config, modeling, rundir, tracking
from launcher import recipe as recipes
from launcher.consolidate import resolve_checkpoint
from launcher.errors import EXIT_BAD_INPUT, RecipeError

STOPPED = "stopped.json"  # written when a stop request ended training early: the job script requeues on it


def run(recipe_path: str, overrides: dict) -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)  # libraries' deprecation notes, noise to users
    rank, world = distributed_env()
    run_dir = None
    try:
        recipe = recipes.load(recipe_path, overrides)
        run_dir = Path(recipe.run.output_dir)
        _train(recipe, recipe_path, rank, world)
    except RecipeError as err:
        if rank == 0:  # every rank finds the same problem; say it once
            print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(EXIT_BAD_INPUT)
    except Exception as err:
        print(crash_line(err, rank, run_dir), file=sys.stderr, flush=True)
        sys.exit(1)


def crash_line(err: Exception, rank: int, run_dir: Path | None) -> str:
    """One line per failing rank instead of a traceback from each: the traceback goes to the run directory.

    When one rank dies the others fail in their next collective; they say so briefly, pointing at the real error."""
    where = f"rank {rank} ({socket.gethostname()})"
    first = (str(err).strip().splitlines() or [""])[0][:300]
    kind = type(err).__name__
    if any(c.__name__ == "DistError" for c in type(err).__mro__) or "Connection closed by peer" in str(err):
        line = f"error: {where} lost contact with another rank ({kind}: {first}); the rank that failed says why"
    else:
        line = f"error: {where} failed: {kind}: {first}"
    if run_dir is None:
        return line + "\n" + traceback.format_exc()
    saved = run_dir / "ranks" / f"rank{rank}.traceback"
    rundir.write_atomic(saved, traceback.format_exc())
    return f"{line} [traceback: {saved}]"


def _train(recipe, recipe_path: str, rank: int, world: int) -> None:
    # --- recipe: validated and resolved exactly as `plan` did, for the world size these ranks form
    ds, batch = ds_config.resolve(recipe, world, recipes.model_config(recipe, recipe_path), recipe_path)
    run_dir = Path(recipe.run.output_dir)
    tracking.check_credentials(recipe, recipe_path)
    resume = checkpoints.resume_point(run_dir, recipe.run.resume, world)
    if resume and checkpoints.finished(resume):
        if rank == 0:
            print(f"{run_dir}: already trained to the end ({resume.name}); nothing to do", flush=True)
        return
    if rank == 0:
        start_run_dir(run_dir, recipe, ds, resume)

    import deepspeed  # heavy imports only once the recipe is known to be good
    import torch
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    from launcher import freeze
    from launcher.callbacks import STOP_FILE_ENV, CompleteCheckpoints, Perplexity, StopOnRequest

    on_gpu = torch.cuda.is_available()
    seed = ds_config.training_value(recipe, "seed")

    # --- tokenizer and data
    if rank != 0:  # one set of progress bars, not one per rank, ahead of any error line
        import datasets

        datasets.disable_progress_bars()
    tokenizer = modeling.load_tokenizer(recipe)
    train_set, eval_set = data.load(recipe, recipe_path, seed)

    # --- training arguments before the model: under ZeRO-3 the model is partitioned while it is built.
    # Retention is ours (callbacks.CompleteCheckpoints): HF's rotation would count half-written checkpoints.
    # SFTConfig for every task: it is the HF TrainingArguments plus SFT fields (the schema refuses those for other
    # tasks), so one schema, one set of defaults and one DeepSpeed resolution serve SFTTrainer and Trainer alike.
    training = {**recipe.training, "save_total_limit": None}
    if recipe.task != "sft":  # the HF Trainer counts tokens only when asked (TRL always does): for W&B throughput
        training.setdefault("include_num_input_tokens_seen", "non_padding")
    args = SFTConfig(output_dir=str(checkpoints.directory(run_dir)), deepspeed=ds, use_cpu=not on_gpu, **training)
    if args.world_size != world:  # reading it joins the process group: ZeRO-3 partitions the model at build time
        raise RuntimeError(f"the trainer sees world size {args.world_size}, the launcher started {world} ranks")
    if not on_gpu:  # CPU ranks talk over gloo. DeepSpeed's shared-memory collectives are a C++ build at first use,
        # and a build killed half-way leaves a lock file that makes every later start wait on it forever.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed()  # on CPU accelerate joins through torch alone; DeepSpeed must see that group too

    # --- model (a new head for classification), frozen parts, LoRA adapters when the recipe asks
    set_seed(seed)
    model = modeling.load_model(recipe, on_gpu)
    if recipe.task == "sft":  # saved with every checkpoint, which consolidation then copies as it is
        modeling.stop_at_end_of_turn(model.generation_config, tokenizer)
    trainable = freeze.apply(model, recipe.freeze, recipe_path)
    peft_config = modeling.lora_config(recipe, model, recipe_path)

    # --- trainer: TRL's for SFT, the HF Trainer for a classification or regression head
    stopper = StopOnRequest(os.environ[STOP_FILE_ENV]) if os.environ.get(STOP_FILE_ENV) else None
    callbacks = [CompleteCheckpoints(run_dir, world, ds_config.zero_stage(ds, recipe.deepspeed.config),
                                     recipe.training.get("save_total_limit")), *([stopper] if stopper else [])]
    if recipe.task == "sft":
        trainer = SFTTrainer(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set,
                             processing_class=tokenizer, peft_config=peft_config, callbacks=[*callbacks, Perplexity()])
    else:
        from launcher import classify

        trainer = classify.make_trainer(recipe, model, args, tokenizer, train_set, eval_set, callbacks,
                                        ds_config.training_value(recipe, "max_length"))
    tracker = None
    if rank == 0:
        start = f", resuming from {resume.name}" if resume else ""
        print(f"training {recipe.run.name}: {len(train_set)} rows, {batch}{start}", flush=True)
        if recipe.freeze:
            print(f"freeze: {freeze.describe(*trainable)}", flush=True)
        tracker = start_tracking(recipe, run_dir, ds, world, str(batch), model)
        if tracker:
            trainer.add_callback(tracking.make_callback(tracker, world, modeling.parameter_count(model)))

    # --- train; the final step always writes a sharded checkpoint
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    rundir.record_rank(run_dir, rank, world, trainer.model_wrapped.config)

    # --- save the loss history next to the checkpoints; rank 0 merges the shards once every rank has saved
    trainer.save_state()
    torch.distributed.barrier()
    if rank != 0:
        return
    if stopper and stopper.stopped_at is not None:
        if tracker:
            tracker.finish()
        rundir.write_atomic(run_dir / STOPPED, json.dumps({"step": stopper.stopped_at}) + "\n")
        print(f"stopped at step {stopper.stopped_at} on request, with a complete checkpoint; the same command "
              "continues the run", flush=True)
        return
    print(summary(trainer, run_dir), flush=True)
    if recipe.run.consolidate:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        from launcher.consolidate import consolidate

        unset_hf_deepspeed_config()  # else building the model to merge into would start a ZeRO-3 partition
        consolidate(str(run_dir), str(run_dir / "final"), overwrite=True)  # its newest complete checkpoint
    if tracker:
        if recipe.wandb.log_model and (run_dir / "final").is_dir():
            tracking.log_model(tracker, run_dir / "final", recipe.run.name)
        tracker.finish()


def start_tracking(recipe, run_dir: Path, ds: dict, world: int, batch: str, model):
    if recipe.wandb is None or recipe.wandb.mode == "disabled":
        return None
    nodes = int(os.environ.get("CROSS_SIZE", "1"))  # set by DeepSpeed's launcher
    config = tracking.run_config(recipes.to_dict(recipe), ds, world, nodes, batch, run_dir)
    run = tracking.start(recipe, run_dir, config)
    print(f"W&B run {run.id} ({recipe.wandb.mode}): {run.url or run_dir / 'wandb'}", flush=True)
    return run


def start_run_dir(run_dir: Path, recipe, ds: dict, resume: Path | None) -> None:
    """Rank 0: snapshot what runs, and move checkpoints cut short by an earlier crash out of the way."""
    text = recipes.dump(recipe)
    if resume is not None and resume.parent == checkpoints.directory(run_dir):
        rundir.check_same_recipe(run_dir, text)
    for moved in checkpoints.set_aside(run_dir, checkpoints.incomplete(run_dir)):
        print(f"skipping incomplete checkpoint (no {checkpoints.MARKER}; moved to {moved})", flush=True)
    (run_dir / STOPPED).unlink(missing_ok=True)
    rundir.write_atomic(run_dir / "recipe.yaml", text)
    rundir.write_atomic(run_dir / "ds_config.json", ds_config.to_json(ds))
    rundir.record_environment(run_dir)


def summary(trainer, run_dir: Path) -> str:
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    lines = [f"done: {trainer.state.global_step} steps"]
    if losses:
        lines[0] += f", training loss {losses[0]:.3f} -> {losses[-1]:.3f}"
    evals = [e for e in trainer.state.log_history if "eval_loss" in e]
    if evals:
        shown = [k for k in ("eval_loss", "eval_perplexity", "eval_accuracy", "eval_f1", "eval_mse") if k in evals[-1]]
        lines[0] += "; last eval: " + ", ".join(f"{k.removeprefix('eval_')} {evals[-1][k]:.4g}" for k in shown)
    checkpoint = resolve_checkpoint(run_dir)  # the newest complete one, as consolidation picks it
    lines += [f"run directory: {run_dir}", f"checkpoint:    {checkpoint} (ZeRO shards of every rank)"]
    return "\n".join(lines)


def distributed_env() -> tuple[int, int]:
    """(rank, world size); a process started without a launcher becomes rank 0 of 1 on a free local port."""
    if "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    """Entry point for `python -m launcher.train` and `deepspeed --module launcher.train`."""
    import fire

    # The deepspeed launcher inserts --local_rank=N; LOCAL_RANK in the environment says the same.
    argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    fire.Fire(lambda recipe, **overrides: run(recipe, overrides), command=argv, name="launcher.train")


if __name__ == "__main__":
    main()
