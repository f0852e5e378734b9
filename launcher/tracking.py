"""Weights & Biases: one W&B run per training run, continued across resumes and requeues, opened by global rank 0.

Lineage both ways: <run dir>/wandb.json holds the W&B run id and URL; the W&B config holds the run directory and
the Slurm job. Credentials stay in the environment (WANDB_API_KEY or `wandb login`): never in the config or a file
the launcher writes.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
import uuid
from pathlib import Path

from launcher.errors import RecipeError, exits_cleanly
from launcher.rundir import write_atomic
from launcher.schema import Recipe

# Dense (no 2:4 sparsity) 16-bit tensor-core peak FLOP/s and SM count per device, for model FLOPs utilisation; devices
# not listed get no MFU. Matched on whole words of the device name, variants first: "L40" is not the L4, "H20" not the
# H200. From the vendors' datasheets (sparse figures halved): H100 SXM 989 / PCIe 756 / NVL 835 TFLOPS and H200 SXM
# 989 / NVL 835 (NVIDIA H100 and H200 datasheets; H800 and GH200 are H100 silicon at its clocks); H20 148 (NVIDIA H20
# spec, 78 SMs); A100 and A800 312 (A100 datasheet, 624 with sparsity); HGX B200 2,250 (4.5 PFLOPS sparse, HGX B200
# spec); L40S 362.05 and L40 181.05 (L40/L40S datasheets); L4 121 (242 sparse, L4 datasheet); A10 125 (A10
# datasheet); A10G 70 (AWS's A10 variant, per Baseten's "A10 vs A10G" comparison of the two spec sheets); V100 SXM2
# 125 / PCIe 112 / V100S 130 and T4 65, all fp16: they have no bf16 tensor cores (V100 and T4 datasheets).
PEAK_FLOPS = [  # (model, variant word or None, FLOP/s, SMs of the whole GPU, fp16 only)
    ("H100", "PCIE", 756e12, 114, False), ("H100", "NVL", 835e12, 132, False), ("H100", None, 989e12, 132, False),
    ("H200", "NVL", 835e12, 132, False), ("H200", None, 989e12, 132, False), ("GH200", None, 989e12, 132, False),
    ("H800", "PCIE", 756e12, 114, False), ("H800", None, 989e12, 132, False), ("H20", None, 148e12, 78, False),
    ("A100", None, 312e12, 108, False), ("A800", None, 312e12, 108, False), ("B200", None, 2250e12, 148, False),
    ("L40S", None, 362e12, 142, False), ("L40", None, 181e12, 142, False), ("L4", None, 121e12, 58, False),
    ("A10G", None, 70e12, 80, False), ("A10", None, 125e12, 72, False), ("V100S", None, 130e12, 80, True),
    ("V100", "PCIE", 112e12, 80, True), ("V100", None, 125e12, 80, True), ("T4", None, 65e12, 40, True),
]


def peak_flops(name: str, bf16: bool, sms: int | None = None) -> float | None:
    """Dense 16-bit peak of the device called `name` (torch.cuda.get_device_name), None when unknown or when a bf16
    run meets an fp16-only device. A MIG slice gets its share: its SM count (the device properties') over the whole
    GPU's, or without one its compute slices ("MIG 3g.40gb": 3) of 7, the most a GPU is cut into."""
    words = set(re.findall(r"[A-Z0-9]+", name.upper()))
    for model, variant, peak, full_sms, fp16_only in PEAK_FLOPS:
        if model in words and (variant is None or variant in words):
            if fp16_only and bf16:
                return None
            if "MIG" in words:
                slices = re.search(r"MIG (\d+)g", name, re.IGNORECASE)
                return peak * sms / full_sms if sms else peak * int(slices.group(1)) / 7 if slices else None
            return peak
    return None


def flops_per_token(trainable: int, frozen: int, layers: int = 0, attention_dim: int = 0, context: int = 0) -> int:
    """Training FLOPs per token: 6 per trainable weight (forward, input gradients, weight gradients), 4 per frozen one
    (no weight gradients), and causal attention's two seq x seq products, 6 x layers x context x heads*head_dim
    (2 x 2 x context / 2 forward, times 3 with the backward; weights frozen or not, both inputs need gradients)."""
    return 6 * trainable + 4 * frozen + 6 * layers * context * attention_dim


def model_flops(model, context: int) -> int:
    """flops_per_token of a (peft, ZeRO-3 or bitsandbytes) model: ds_numel is a ZeRO-3 slice's full size, and a 4-bit
    weight packs two into a byte, its quant_state keeping the real shape."""
    trainable = frozen = 0
    for p in model.parameters():
        quant = getattr(p, "quant_state", None)
        n = math.prod(quant.shape) if quant is not None else getattr(p, "ds_numel", p.numel())
        trainable, frozen = (trainable + n, frozen) if p.requires_grad else (trainable, frozen + n)
    config = getattr(model, "config", None)
    layers, heads = getattr(config, "num_hidden_layers", 0), getattr(config, "num_attention_heads", 0)
    head_dim = getattr(config, "head_dim", None) or (getattr(config, "hidden_size", 0) // heads if heads else 0)
    return flops_per_token(trainable, frozen, layers or 0, heads * head_dim, context)


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
    project = w.project or stored.get("project") or os.environ.get("WANDB_PROJECT") or w.group or recipe.run.name
    run = wandb.init(project=project, entity=w.entity, name=name, group=w.group, tags=w.tags, notes=w.notes,
                     mode=w.mode, dir=str(run_dir), id=stored.get("id") or uuid.uuid4().hex[:8], resume="allow",
                     config=config)
    run.define_metric("*", step_metric="train/global_step", step_sync=True)
    write_atomic(record, json.dumps({"id": run.id, "name": run.name, "project": project, "entity": w.entity,
                                     "mode": w.mode, "url": run.url}, indent=2) + "\n")
    return run


def run_config(recipe_dict: dict, ds: dict, world: int, nodes: int, batch: str, run_dir: Path) -> dict:
    env = json.loads((run_dir / "environment.json").read_text()) if (run_dir / "environment.json").is_file() else {}
    slurm = {k: os.environ[v] for k, v in (("job_id", "SLURM_JOB_ID"), ("nodelist", "SLURM_JOB_NODELIST"),
                                           ("restart", "SLURM_RESTART_COUNT")) if v in os.environ}
    return {"recipe": recipe_dict, "deepspeed": ds, "world_size": world, "nodes": nodes,
            "ranks_per_node": world // max(nodes, 1), "batch": batch, "run_dir": str(run_dir),
            "versions": env.get("versions"), "git": env.get("git"), "slurm": slurm or None}


def make_throughput(world: int):
    """A callback that measures throughput and writes it into the trainer's logs, for the console, W&B and the
    end-of-run line: tokens/s overall and per device (TRL's `num_tokens`, or the HF Trainer's non-padding
    `num_input_tokens_seen`, counts non-padding tokens over all ranks) over the time spent training (evaluation and
    checkpoint saves left out); the share of padding among the positions trained (the HF Trainer's count of all
    positions, `include_num_input_tokens_seen: all`, against TRL's non-padding one); and on known GPUs the model
    FLOPs utilisation: model_flops(model, max_length) x tokens/s over the devices' peak (the model, seen at the start
    of training, says which weights train)."""
    import torch
    from transformers import TrainerCallback

    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else ""
    sms = torch.cuda.get_device_properties(0).multi_processor_count if cuda else None

    class Throughput(TrainerCallback):
        since = None  # when the previous train log (or the start) was
        counts: dict = {}  # the trainer's token counts at that time: TRL's restarts at 0, the HF Trainer's resumes
        paused = 0.0  # seconds of evaluation and saving since then
        step_end = 0.0  # when the last optimizer step ended: what follows it until the next step is not training
        per_token = peak = None
        totals = (0, 0.0, 0, 0)  # tokens, training seconds, positions and their non-padding tokens, since the start

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.since, self.paused = time.monotonic(), 0.0
            self.counts = {"num_tokens": 0, "num_input_tokens_seen": getattr(state, "num_input_tokens_seen", 0)}
            if args.bf16 or args.fp16:  # tensor-core peaks are 16-bit ones; an fp32 run has no MFU
                self.peak = peak_flops(device, bool(args.bf16), sms)
            # attention at the full max_length: exact for packed rows, an upper bound for shorter unpacked ones
            self.per_token = model_flops(model, getattr(args, "max_length", None) or 0) if model is not None else None

        def on_step_end(self, args, state, control, **kwargs):
            self.step_end = time.monotonic()

        def pause(self) -> None:  # evaluation or a save just ended; it began when the last step ended
            now = time.monotonic()
            if self.since is not None:
                self.paused += now - max(self.step_end, self.since)
            self.step_end = now

        def on_evaluate(self, args, state, control, **kwargs):
            self.pause()

        def on_save(self, args, state, control, **kwargs):
            self.pause()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs is None or "loss" not in logs or self.since is None:
                return  # evaluation, or the run's closing log (the HF Trainer's totals, without TRL's count)
            key = "num_tokens" if "num_tokens" in logs else "num_input_tokens_seen"  # TRL's, else the HF Trainer's
            if key not in logs:
                return
            counted, now = logs[key] - self.counts[key], time.monotonic()
            seconds = max(now - self.since - self.paused, 1e-9)
            logs.update(tokens_per_second=counted / seconds, tokens_per_second_per_device=counted / seconds / world)
            if self.peak and self.per_token:
                logs["mfu"] = self.per_token * counted / seconds / (self.peak * world)
            n, t, p, q = self.totals
            if key == "num_tokens" and "num_input_tokens_seen" in logs:  # every position, padding too
                positions = logs["num_input_tokens_seen"] - self.counts["num_input_tokens_seen"]
                logs["padding_share"] = 1 - counted / positions if positions else 0.0
                p, q = p + positions, q + counted
            self.totals = (n + counted, t + seconds, p, q)
            self.counts = {**self.counts, **{k: logs[k] for k in self.counts if k in logs}}
            self.since, self.paused = now, 0.0

        def summary(self) -> str | None:
            """One line for the end of the run, or None before the first train log."""
            tokens, seconds, positions, unpadded = self.totals
            if not tokens:
                return None
            rate = tokens / seconds
            line = f"speed: {rate:,.0f} non-padding tokens/s ({rate / world:,.0f} per device)"
            if positions:
                line += f", {1 - unpadded / positions:.1%} of the positions trained were padding"
            if self.peak and self.per_token:
                line += f", MFU {self.per_token * rate / (self.peak * world):.1%} ({device})"
            return line

    return Throughput()


def make_callback(run):
    """Logs to W&B what the trainer logs, throughput included (make_throughput's callback, added before this one,
    writes it into the same logs)."""
    from transformers import TrainerCallback

    class Tracker(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            evaluation = any(k.startswith("eval_") for k in logs or {})
            prefix = "eval/" if evaluation else "train/"
            metrics = {(f"eval/{k[5:]}" if k.startswith("eval_") else prefix + k): v for k, v in (logs or {}).items()
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
