"""Weights & Biases: one W&B run per training run, continued across resumes and requeues, opened by global rank 0.

Lineage both ways: <run dir>/wandb.json holds the W&B run id and URL; the W&B config holds the run directory and
the Slurm job. Credentials stay in the environment (WANDB_API_KEY or `wandb login`): never in the config or a file
the launcher writes.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

from launcher.errors import RecipeError, exits_cleanly
from launcher.rundir import write_atomic
from launcher.schema import Recipe

# Dense bf16 peak FLOP/s per device, for model FLOPs utilisation; devices not listed get no MFU.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12,
              "V100": 125e12}


def check_credentials(recipe: Recipe, where: str) -> None:
    """Online tracking without a key fails when the first rank starts, hours into a queue: say so now."""
    if recipe.wandb is None or recipe.wandb.mode != "online" or os.environ.get("WANDB_MODE") in ("offline", "disabled"):
        return
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    logged_in = netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")
    if not os.environ.get("WANDB_API_KEY") and not logged_in:
        raise RecipeError(f"{where}: wandb.mode is online but no W&B key is set: export WANDB_API_KEY, run "
                          "`wandb login`, or use wandb.mode: offline (and `wandb sync` later)")


def start(recipe: Recipe, run_dir: Path, config: dict):
    """Open (or continue) this run's W&B run; rank 0 only. The id stored in the run directory makes a resumed or
    requeued job continue the same W&B run rather than start a second one."""
    import wandb

    w, record, job = recipe.wandb, run_dir / "wandb.json", os.environ.get("SLURM_JOB_ID")
    stored = json.loads(record.read_text()) if record.is_file() else {}
    name = stored.get("name") or w.name or f"{recipe.run.name}-{job or time.strftime('%Y%m%d-%H%M%S')}"
    run = wandb.init(project=w.project, entity=w.entity, name=name, group=w.group, tags=w.tags, notes=w.notes,
                     mode=w.mode, dir=str(run_dir), id=stored.get("id") or uuid.uuid4().hex[:8], resume="allow",
                     config=config)
    run.define_metric("*", step_metric="train/global_step", step_sync=True)
    write_atomic(record, json.dumps({"id": run.id, "name": run.name, "project": w.project, "entity": w.entity,
                                     "mode": w.mode, "url": run.url}, indent=2) + "\n")
    return run


def run_config(recipe_dict: dict, ds: dict, world: int, nodes: int, batch: str, run_dir: Path) -> dict:
    env = json.loads((run_dir / "environment.json").read_text()) if (run_dir / "environment.json").is_file() else {}
    slurm = {k: os.environ[v] for k, v in (("job_id", "SLURM_JOB_ID"), ("nodelist", "SLURM_JOB_NODELIST"),
                                           ("restart", "SLURM_RESTART_COUNT")) if v in os.environ}
    return {"recipe": recipe_dict, "deepspeed": ds, "world_size": world, "nodes": nodes,
            "ranks_per_node": world // max(nodes, 1), "batch": batch, "run_dir": str(run_dir),
            "versions": env.get("versions"), "git": env.get("git"), "slurm": slurm or None}


def make_callback(run, world: int, params: int):
    """Logs what the trainer logs, plus throughput: tokens/s overall and per device (TRL's `num_tokens`, or the HF
    Trainer's non-padding `num_input_tokens_seen`, counts non-padding tokens over all ranks), and on known GPUs the
    model FLOPs utilisation, 6 x params x tokens/s over the devices' peak."""
    import torch
    from transformers import TrainerCallback

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    peak = next((v for k, v in PEAK_FLOPS.items() if k in device), None)

    class Tracker(TrainerCallback):
        last = None  # (time, num_tokens) at the previous log

        def on_train_begin(self, args, state, control, **kwargs):
            self.last = (time.monotonic(), None)

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = dict(logs or {})
            tokens = logs.get("num_tokens", logs.get("num_input_tokens_seen"))  # TRL's, else the HF Trainer's
            if tokens is not None and self.last is not None:
                (since, before), now = self.last, time.monotonic()
                counted = tokens - before if before is not None and tokens >= before else tokens
                rate = counted / max(now - since, 1e-9)
                logs.update(tokens_per_second=rate, tokens_per_second_per_device=rate / world)
                if peak:
                    logs["mfu"] = 6 * params * rate / (peak * world)
                self.last = (now, tokens)
            prefix = "eval/" if any(k.startswith("eval_") for k in logs) else "train/"
            metrics = {(f"eval/{k[5:]}" if k.startswith("eval_") else prefix + k): v for k, v in logs.items()
                       if isinstance(v, (int, float))}
            run.log({**metrics, "train/global_step": state.global_step})

        def on_train_end(self, args, state, control, **kwargs):
            run.summary["train/global_step"] = state.global_step

    return Tracker()


def log_model(run, model_dir: Path, name: str) -> None:
    import wandb

    artifact = wandb.Artifact(f"{name}-model", type="model")
    artifact.add_dir(str(model_dir))
    run.log_artifact(artifact)


@exits_cleanly
def log_final_model(run_dir: str) -> None:
    """wandb.log_model for a Slurm job: its training step runs without consolidation, so the job uploads final/
    in a step of its own, right after the consolidation step wrote it (never an older final/), into the run's W&B
    run, continued by the id in wandb.json as `start` does."""
    import yaml

    run_dir = Path(run_dir)
    snapshot = yaml.safe_load((run_dir / "recipe.yaml").read_text()) or {}  # the recipe the job trained
    w = snapshot.get("wandb")
    if not w or not w.get("log_model") or w.get("mode") == "disabled":
        return
    record = run_dir / "wandb.json"
    if not record.is_file():
        raise RecipeError(f"{record}: not found, so there is no W&B run to add the model to (wandb.log_model)")
    import wandb

    stored = json.loads(record.read_text())
    run = wandb.init(project=stored["project"], entity=stored["entity"], id=stored["id"], name=stored["name"],
                     mode=stored["mode"], dir=str(run_dir), resume="allow")
    log_model(run, run_dir / "final", snapshot["run"]["name"])
    run.finish()
    print(f"W&B run {run.id}: uploaded the model in {run_dir / 'final'}", flush=True)


if __name__ == "__main__":  # the Slurm job's upload step: python -m launcher.tracking RUN_DIR
    import sys

    log_final_model(*sys.argv[1:2])
