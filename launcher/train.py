"""The training worker: one rank of a run, in three parts: `build` (tokenizer, data, training arguments, process
group, model, freeze, LoRA, trainer), `train` and `finish`. The dry run calls the same `build` on a shrunk recipe.

Started by the real launcher as `deepspeed ... --module launcher.train RECIPE [--section.key=value ...]` (what
`launcher launch` runs; you may run it yourself), or in-process as a single rank by `launcher train RECIPE`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher import (
    checkpoints,
    console,
    curves,
    data,
    ds_config,
    jit_ops,
    modeling,
    pipeline,
    preflight,
    rundir,
    startup,
    topology,
    tracking,
    universal,
    weights,
)
from launcher import recipe as recipes
from launcher.consolidate import resolve_checkpoint
from launcher.errors import EXIT_BAD_INPUT, RecipeError
from launcher.schema import fail


def run(recipe_path: str, overrides: dict) -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)  # libraries' deprecation notes, noise to users
    logging.getLogger("transformers.trainer").addFilter(drop_zero_to_fp32_advice)
    if (devices := topology.visible_devices(dict(os.environ))) is not None:  # before anything touches CUDA
        os.environ["CUDA_VISIBLE_DEVICES"] = devices
    rank, world = distributed_env()
    run_dir, training = None, False
    try:
        # --- the gate, as `launch` passed it: ranks re-check what they start from (the data they load below)
        run = pipeline.prepare(recipe_path, overrides, topology.Topology((world,)), check_data=False)
        run_dir = run.run_dir
        if run.finished:
            if rank == 0:
                print(run.status(), flush=True)
            return
        if rank == 0:
            pipeline.write(run, run.plan.snapshot())
        if run.universal and not universal.ready(run.resume):  # `launch` converts before it starts the ranks
            if world > 1:
                raise RecipeError(f"{run.resume}: saved by another number of ranks and not converted to DeepSpeed's "
                                  "universal format yet: start with `launcher launch`, which converts it first")
            universal.convert(run.resume)
        weights.fetch(run.recipe)  # before joining the process group, whose collectives time out
        built = build(run.recipe, run.plan.ds_config, recipe_path, world)
        training = True
        tracker = train(built, run, rank, world)
        finish(built, run, tracker, rank)
    except RecipeError as err:
        if world > 1 and not startup.reported():  # found before this rank reported in: tell the others
            try:
                startup.report_in(run_dir, str(err))
            except RecipeError as everyone:
                err = everyone
        if rank == 0:  # rank 0 speaks for all ranks
            print(f"error: {err}", file=sys.stderr, flush=True)
        if world > 1 and not training and (dist := sys.modules.get("torch.distributed")) and dist.is_initialized():
            # every rank stops here at once, and a rank whose peers have gone dies at exit in the process group's
            # threads ("terminate called without an active exception": exit code 250, not 2); nothing is left to
            # save before training, so leave without the interpreter's teardown
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(EXIT_BAD_INPUT)
        sys.exit(EXIT_BAD_INPUT)
    except Exception as err:  # one line per failing rank, not a traceback from each: that goes to the run directory
        where, kind = f"rank {rank} ({socket.gethostname()})", type(err).__name__
        first = (str(err).strip().splitlines() or [""])[0][:300]
        if any(c.__name__ == "DistError" for c in type(err).__mro__) or "Connection closed by peer" in str(err):
            # when one rank dies the others fail in their next collective: briefly, pointing at the real error
            line = f"error: {where} lost contact with another rank ({kind}: {first}); the rank that failed says why"
        else:
            line = f"error: {where} failed: {kind}: {first}"
        if run_dir is None:
            line += "\n" + traceback.format_exc()
        else:
            saved = run_dir / "ranks" / f"rank{rank}.traceback"
            rundir.write_atomic(saved, traceback.format_exc())
            line += f" [traceback: {saved}]"
        print(line, file=sys.stderr, flush=True)
        sys.exit(1)


@dataclass
class Built:
    """What `build` made: the trainer (holding the model, arguments and prepared data) and what it was made from."""

    trainer: Any
    tokenizer: Any
    train_set: Any  # the rows as loaded, before the trainer tokenized them
    eval_set: Any
    trainable: tuple[int, int]  # (trainable, total) parameters
    stopper: Any = None
    throughput: Any = None  # tokens/s, padding and MFU, for the logs and the end-of-run line


def build(recipe, ds: dict, where: str, world: int, stage=lambda name: contextlib.nullcontext(),
          select=None) -> Built:
    """Every step from recipe to a ready trainer, as the worker and the dry run both run it. stage(name): a context
    for each step (the dry run names the failing one); select(train, eval): a cut of the rows (the dry run's)."""
    import deepspeed  # heavy imports only once the recipe is known to be good
    import torch
    from transformers import set_seed
    from trl import SFTConfig

    from launcher import freeze
    from launcher.callbacks import STOP_FILE_ENV, CompleteCheckpoints, Perplexity, StopOnRequest

    on_gpu = torch.cuda.is_available()
    seed = ds_config.training_value(recipe, "seed")
    run_dir = Path(recipe.run.output_dir)

    # --- tokenizer and data; the chat template must mark the tokens that carry the loss
    with stage("dataset"):
        if int(os.environ.get("RANK", "0")) != 0:  # one set of progress bars, not one per rank
            import datasets

            datasets.disable_progress_bars()
        tokenizer = modeling.load_tokenizer(recipe)
        loaded: list = []
        train_set, eval_set = data.load(recipe, where, seed, loaded=loaded)
        if select:
            train_set, eval_set = select(train_set, eval_set)
    with stage("loss tokens"):
        preflight.check_template(recipe, where, tokenizer, loaded)

    # --- training arguments before the model: under ZeRO-3 the model is partitioned while it is built.
    # SFTConfig for every task: it is the HF TrainingArguments plus SFT fields (the schema refuses those for other
    # tasks), so one schema, one set of defaults and one DeepSpeed resolution serve SFTTrainer and Trainer alike.
    with stage("model"):
        jit_ops.prepare()  # before any DeepSpeed op is built: this CPU type's directory, no stale build lock
        training = training_arguments(recipe, ds_config.zero_stage(ds, recipe.deepspeed.config))
        args = SFTConfig(output_dir=str(checkpoints.directory(run_dir)), deepspeed=ds, use_cpu=not on_gpu, **training)
        if args.world_size != world:  # reading it joins the process group: ZeRO-3 partitions the model at build
            raise RuntimeError(f"the trainer sees world size {args.world_size}, the launcher started {world} ranks")
        if not on_gpu:  # CPU ranks talk over gloo. DeepSpeed's shared-memory collectives are a C++ build at first
            # use, and a build killed half-way leaves a lock file that makes every later start wait on it forever.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        deepspeed.init_distributed()  # on CPU accelerate joins through torch alone; DeepSpeed must see it too
        if world > 1:  # the first collective: no rank goes on while another has a problem
            startup.report_in(run_dir, None)

        # --- model (a new head for classification), frozen parts, LoRA adapters when the recipe asks
        set_seed(seed)
        model = modeling.load_model(recipe, on_gpu)
        if recipe.task == "sft":  # saved with every checkpoint, which consolidation then copies as it is
            modeling.stop_at_end_of_turn(model.generation_config, tokenizer)
        trainable = freeze.apply(model, recipe.freeze, where)
    with stage("LoRA targets"):
        peft_config = modeling.lora_config(recipe, model, where)

    # --- trainer: TRL's for SFT (it tokenizes the data), the HF Trainer for a classification or regression head
    stopper = StopOnRequest(os.environ[STOP_FILE_ENV]) if os.environ.get(STOP_FILE_ENV) else None
    throughput = tracking.make_throughput(world)
    callbacks = [*([stopper] if stopper else []), throughput,  # stopper first: it sets should_save, which
                 # CompleteCheckpoints reads; throughput before W&B's callback (train adds it), which logs its numbers
                 CompleteCheckpoints(run_dir, world, ds_config.zero_stage(ds, recipe.deepspeed.config),
                                     recipe.training.get("save_total_limit"))]
    with stage("tokenize"):
        if recipe.task == "sft":  # tokenized once, into the cache (launcher/tokenized.py), and loaded from there
            from launcher import tokenized

            trainer = tokenized.trainer_class()(model=model, args=args, train_dataset=train_set,
                                                eval_dataset=eval_set, processing_class=tokenizer,
                                                peft_config=peft_config, callbacks=[*callbacks, Perplexity()],
                                                tokenized_cache=tokenized.cache_dir(recipe), run_dir=run_dir,
                                                questions=eval_questions(recipe, tokenizer, eval_set, where),
                                                samples=samples_file(recipe, run_dir))
        else:
            import importlib

            max_length = ds_config.training_value(recipe, "max_length")
            setattr(model.config, modeling.LENGTH_KEY, max_length)  # saved with every checkpoint, for evaluate
            if peft_config is not None:  # TRL's SFTTrainer wraps its own; the HF Trainer takes a wrapped model
                model = modeling.with_adapters(model, peft_config, recipe, args.gradient_checkpointing)
            trainer = importlib.import_module(f"launcher.{HEAD_MODULES[recipe.task]}").make_trainer(
                recipe, model, args, tokenizer, train_set, eval_set, callbacks, max_length)
    if not os.environ.get(console.VERBOSE):
        quiet(trainer, run_dir)
    return Built(trainer, tokenizer, train_set, eval_set, trainable, stopper, throughput)


# the module that builds each head task's HF Trainer
HEAD_MODULES = {"classification": "classify", "regression": "classify", "token_classification": "tagging",
                "question_answering": "extractive"}


def quiet(trainer, run_dir: Path) -> None:
    """One progress bar and a line per evaluation on the console (callbacks.QuietProgress), every logged dict in
    <run dir>/logs/metrics.jsonl; no bars of transformers' own (the empty "Writing model shards" at each ZeRO-3
    save, "Loading weights")."""
    from transformers.trainer_callback import ProgressCallback
    from transformers.utils import logging as hf_logging

    from launcher.callbacks import QuietProgress

    hf_logging.disable_progress_bar()
    if trainer.pop_callback(ProgressCallback) is not None:  # absent under disable_tqdm (the dry run)
        trainer.add_callback(QuietProgress(run_dir / "logs" / "metrics.jsonl"))


def samples_file(recipe, run_dir: Path) -> Path | None:
    """Where this rank records the rows it trains on (run.log_samples)."""
    rank = os.environ.get("RANK", "0")
    return run_dir / "logs" / f"samples-rank{rank}.jsonl" if recipe.run.log_samples else None


def eval_questions(recipe, tokenizer, eval_set, where: str):
    """What the answers are scored on at each evaluation (run.eval_answers): the first N eval rows' prompts and
    references, and room for the longest reference plus a few tokens (a longer answer is wrong anyway)."""
    if not recipe.run.eval_answers or eval_set is None:
        return None
    from launcher.evaluate import questions

    asked = questions(tokenizer, eval_set.select(range(min(recipe.run.eval_answers, len(eval_set)))))
    if not asked:
        fail(where, "run.eval_answers", "the eval rows are text rows, which have no answer to score: give chats "
             "(messages) or prompt/completion rows")
    longest = max(len(tokenizer(reference, add_special_tokens=False)["input_ids"]) for _, _, reference in asked)
    return asked, longest + 8


def training_arguments(recipe, stage: int) -> dict[str, Any]:
    """The recipe's training section as SFTConfig takes it. Retention is ours (callbacks.CompleteCheckpoints): HF's
    rotation would count half-written checkpoints. LoRA under ZeRO-3 with activation checkpointing needs reentrant
    checkpointing (trl #2514); TRL's SFTTrainer sets it, but only after TrainingArguments.__post_init__ has copied
    the kwargs to activation_checkpointing_kwargs, which the Trainer reads: so it never took effect. Set here."""
    training = {**recipe.training, "save_total_limit": None}
    # the HF Trainer counts tokens only when asked: for SFT every position (TRL counts the non-padding ones: the two
    # give the share of padding), for a head the non-padding ones (its tokens/s)
    training.setdefault("include_num_input_tokens_seen", "all" if recipe.task == "sft" else "non_padding")
    if recipe.task == "question_answering":  # the Trainer reads the eval labels under these names
        training.setdefault("label_names", ["start_positions", "end_positions"])
    checkpointing = training.get("activation_checkpointing") or training.get("gradient_checkpointing")
    if recipe.lora and stage == 3 and checkpointing:
        given = training.pop("activation_checkpointing_kwargs", None) or training.pop("gradient_checkpointing_kwargs",
                                                                                     None)
        training["activation_checkpointing_kwargs"] = {**(given or {}), "use_reentrant": True}
    return training


def train(built: Built, run: pipeline.Run, rank: int, world: int):
    """From the gate's resume point; the last step always writes a sharded checkpoint. Returns rank 0's W&B run."""
    import torch

    from launcher import freeze

    recipe, trainer, tracker = run.recipe, built.trainer, None
    if rank == 0:
        start = f", resuming from {run.resume.name}" if run.resume else ""
        changed = f"; changed since the run started: {', '.join(run.changes)}" if run.changes else ""
        print(f"training {recipe.run.name}: {len(built.train_set)} rows, {run.plan.batch}{start}{changed}", flush=True)
        if recipe.freeze:
            print(f"freeze: {freeze.describe(*built.trainable)}", flush=True)
        if recipe.wandb is not None and recipe.wandb.mode != "disabled":
            nodes = int(os.environ.get("CROSS_SIZE", "1"))  # set by DeepSpeed's launcher
            config = tracking.run_config(recipes.to_dict(recipe), run.plan.ds_config, world, nodes, str(run.plan.batch),
                                         run.run_dir)
            tracker = tracking.start(recipe, run.run_dir, config)
            print(f"W&B run {tracker.id} ({recipe.wandb.mode}): {tracker.url or run.run_dir / 'wandb'}", flush=True)
            trainer.add_callback(tracking.make_callback(tracker))
    if run.universal:
        from launcher.callbacks import UniversalResume

        trainer.add_callback(UniversalResume())
    trainer.train(resume_from_checkpoint=str(run.resume) if run.resume else None)
    rundir.record_rank(run.run_dir, rank, world, trainer.model_wrapped.config)
    trainer.save_state()  # the loss history, next to the checkpoints
    torch.distributed.barrier()
    return tracker


def finish(built: Built, run: pipeline.Run, tracker, rank: int) -> None:
    """Rank 0, once every rank has saved: stopped on request (the job requeues), or merge the shards into final/."""
    if rank != 0:
        return
    run_dir, stopper = run.run_dir, built.stopper
    if stopper and stopper.stopped_at is not None:
        rundir.write_atomic(run_dir / pipeline.STOPPED, json.dumps({"step": stopper.stopped_at}) + "\n")
        print(f"stopped at step {stopper.stopped_at} on request, with a complete checkpoint; the same command "
              "continues the run", flush=True)
    else:
        history = built.trainer.state.log_history
        plotted = curves.write(history, run_dir / curves.FILE, run.recipe.run.name)  # before the model card
        checkpoint = resolve_checkpoint(run_dir)  # the newest complete one, as consolidation picks it
        scored = None
        if run.recipe.run.consolidate:
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            from launcher.consolidate import consolidate

            unset_hf_deepspeed_config()  # else building the model to merge into would start a ZeRO-3 partition
            consolidate(str(run_dir), str(run_dir / "final"), overwrite=True)  # its newest complete checkpoint
            if run.recipe.run.score_answers and built.eval_set is not None:
                scored = score_answers(run_dir / "final", built.eval_set, run.recipe.run.score_answers)
        print(summary(built, run, checkpoint, scored, plotted), flush=True)
        if tracker and run.recipe.wandb.log_model and run.recipe.run.consolidate:  # a final/ this call wrote
            tracking.log_model(tracker, run_dir / "final", run.recipe.run.name)
    if tracker:
        tracker.finish()


def score_answers(final: Path, eval_set, rows: int) -> dict:
    """The consolidated model answers the first ROWS eval rows, as `launcher evaluate` would; rank 0 alone, once."""
    from launcher import evaluate

    shown = eval_set.select(range(min(rows, len(eval_set))))
    return evaluate.evaluate_rows(final, evaluate.read_config(final), shown, f"the first {len(shown)} eval rows",
                                  final / "metrics-eval.json")


def summary(built: Built, run: pipeline.Run, checkpoint: Path, scored: dict | None, plotted: str) -> str:
    """The run's closing lines: steps, time, losses, speed, the answers' scores, and where everything is."""
    history, run_dir = built.trainer.state.log_history, run.run_dir
    done = f"done: {built.trainer.state.global_step} steps"
    if runtime := next((e["train_runtime"] for e in reversed(history) if "train_runtime" in e), None):
        done += f" in {runtime:.0f} s"
    losses, evals = [e["loss"] for e in history if "loss" in e], [e for e in history if "eval_loss" in e]
    if losses:
        done += f", training loss {losses[0]:.3f} -> {losses[-1]:.3f}"
    if evals:
        shown = [k for k in ("loss", "perplexity", "exact_match", "accuracy", "f1", "mse") if f"eval_{k}" in evals[-1]]
        done += "; last eval: " + ", ".join(f"{k} {evals[-1][f'eval_{k}']:.4g}" for k in shown)
    lines = [done]
    if speed := built.throughput.summary() if built.throughput else None:
        lines.append(speed)
    if scored:
        lines.append(f"answers: exact match {scored['exact_match']:.3f}, token F1 {scored['f1']:.3f} on "
                     f"{scored['answered']} eval rows ({run_dir / 'final' / 'metrics-eval.json'})")
    lines += [f"run directory: {run_dir}", f"checkpoint:    {checkpoint} (ZeRO shards of every rank)"]
    if (run_dir / "final").is_dir() and run.recipe.run.consolidate:
        lines.append(f"model:         {run_dir / 'final'}")
    history_file = checkpoints.directory(run_dir) / "trainer_state.json"  # every logged value, for plotting again
    return "\n".join([*lines, plotted, f"history:       {history_file}",
                      f"logs:          {run_dir / 'logs'} (all the ranks printed; metrics.jsonl: each logged dict)"])


def drop_zero_to_fp32_advice(record: logging.LogRecord) -> bool:
    """The HF Trainer tells every rank at every ZeRO-3 save to recover the weights with zero_to_fp32.py; the launcher
    consolidates them itself (finish, `launcher consolidate`), so the advice misleads."""
    return "use zero_to_fp32.py to recover weights" not in record.getMessage()


def distributed_env() -> tuple[int, int]:
    """(rank, world size); a process started without a launcher becomes rank 0 of 1 on a free local port."""
    if "WORLD_SIZE" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def main() -> None:
    import fire

    # The deepspeed launcher inserts --local_rank=N; LOCAL_RANK in the environment says the same.
    argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    fire.Fire(lambda recipe, **overrides: run(recipe, overrides), command=argv, name="launcher.train")


if __name__ == "__main__":
    main()
