"""Trainer callbacks of the worker: checkpoint completion markers and retention, and stopping on request.
The hooks change `control` in place and return None: HF's callback handler then keeps that same object."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from launcher import checkpoints

STOP_FILE_ENV = "LAUNCHER_STOP_FILE"  # set by the Slurm job script; its trap creates the file on the signal


class CompleteCheckpoints(TrainerCallback):
    """After every save: each rank flushes its files, all meet at a barrier, then rank 0 writes the marker and
    applies retention (HF's own rotation is switched off: it counts half-written checkpoints too)."""

    def __init__(self, run_dir: Path, world: int, zero_stage: int, keep: int | None):
        self.run_dir, self.world, self.zero_stage, self.keep = run_dir, world, zero_stage, keep

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:  # after a rollback: checkpoints of the continuation it abandons
            for moved in checkpoints.set_aside_after(self.run_dir, state.global_step):
                print(f"rolled back to step {state.global_step}: moved {moved.name} to {moved.parent}", flush=True)

    def on_step_end(self, args, state, control, **kwargs):
        """A save follows, perhaps into an existing checkpoint-N (a USR1 stop under save_strategy epoch saves the same
        step again at the epoch's end): its marker goes first, and the barrier holds every rank back until it is
        gone, so no byte of the new save lands under the old marker. Runs after the callbacks that set should_save
        (HF's flow callback comes first; train.build puts StopOnRequest before this one)."""
        if control.should_save:
            if state.is_world_process_zero:
                checkpoints.unmark(self._checkpoint(state))
            dist.barrier()

    on_epoch_end = on_step_end

    def _checkpoint(self, state) -> Path:
        return checkpoints.directory(self.run_dir) / f"checkpoint-{state.global_step}"

    def on_save(self, args, state, control, **kwargs):
        checkpoint = self._checkpoint(state)
        os.sync()  # this rank's shard files, on their way to disk before anyone declares the checkpoint whole
        dist.barrier()
        if state.is_world_process_zero:
            checkpoints.mark_complete(checkpoint, {"step": state.global_step, "max_steps": state.max_steps,
                                                   "world_size": self.world, "zero_stage": self.zero_stage,
                                                   "global_batch": args.per_device_train_batch_size
                                                   * args.gradient_accumulation_steps * self.world,
                                                   "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
            for old in checkpoints.retain(self.run_dir, self.keep):
                print(f"retention: removed {old.name}", flush=True)


class StopOnRequest(TrainerCallback):
    """Checkpoint and stop when the stop file appears (Slurm's warning signal before a time limit or preemption).

    Ranks must stop after the same step, or the save (a collective) would hang: they agree with one all-reduce per
    step, which costs microseconds next to a training step. Only runs that were given a stop file pay it."""

    def __init__(self, stop_file: str):
        self.stop_file = Path(stop_file)
        self.stopped_at: int | None = None

    def on_step_end(self, args, state, control, **kwargs):
        flag = torch.tensor([1.0 if self.stop_file.exists() else 0.0], device=args.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and not control.should_training_stop:
            control.should_save = control.should_training_stop = True
            self.stopped_at = state.global_step
            if state.is_world_process_zero:
                print(f"stop requested: saving a checkpoint at step {state.global_step} and stopping", flush=True)


class UniversalResume(TrainerCallback):
    """Resumed from a universal checkpoint (another number of ranks): DeepSpeed's ZeRO-3 load leaves one Adam step
    tensor shared by every parameter group, which torch's Adam then advances once per group per step: each group gets
    its own copy (launcher/universal.py). The load happens before on_train_begin."""

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        from launcher import universal

        universal.unshare_adam_steps(optimizer)


class Perplexity(TrainerCallback):
    """SFT: eval_perplexity = exp(eval_loss) beside every eval loss, in the log history and in what is logged next
    (W&B). Must come before the tracking callback."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "eval_loss" in logs:
            logs["eval_perplexity"] = math.exp(min(logs["eval_loss"], 50.0))  # capped: a diverged run stays finite
            if state.log_history and state.log_history[-1].get("eval_loss") == logs["eval_loss"]:
                state.log_history[-1]["eval_perplexity"] = logs["eval_perplexity"]


class QuietProgress(ProgressCallback):
    """The console's one progress bar (rank 0), in place of HF's: the training loss on the bar instead of a dict
    printed at every logging step, and one short line per evaluation above the bar, which gets no bar of its own
    (HF's breaks the training bar). Every logged dict goes to LOG as a JSON line, where nothing is lost."""

    def __init__(self, log: Path):
        super().__init__()
        self.log = log

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if self.training_bar is None:  # an evaluation outside training keeps HF's bar
            super().on_prediction_step(args, state, control, eval_dataloader=eval_dataloader, **kwargs)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "a") as f:
            f.write(json.dumps({"step": state.global_step, **logs}, default=str) + "\n")
        if self.training_bar is None:
            return
        if "eval_loss" in logs:
            self.training_bar.write(evaluated(state.global_step, logs))
        elif isinstance(logs.get("loss"), (int, float)):
            self.training_bar.set_postfix(loss=f"{logs['loss']:.4g}", refresh=False)


def evaluated(step: int, logs: dict) -> str:
    """'step 50: eval loss 1.987, exact match 0.3125, f1 0.8112': the eval loss and the scores a person judges by."""
    names = {"eval_loss": "eval loss", "eval_exact_match": "exact match", "eval_accuracy": "accuracy",
             "eval_f1": "f1", "eval_mse": "mse"}
    shown = [f"{name} {logs[key]:.4g}" for key, name in names.items() if isinstance(logs.get(key), (int, float))]
    return f"step {step}: " + ", ".join(shown)
