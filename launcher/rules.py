"""Every rule that spans more than one recipe key, in one place; `plan` (so every command) runs them all.

Rules on one key live on the key, in schema.py. These need the merged DeepSpeed template or the model's config.
"""

from __future__ import annotations

from launcher import ds_config, ds_fields, memory, packing, sft_fields
from launcher.errors import RecipeError
from launcher.schema import Recipe, fail

# SFT options that mean the same for a classification head: the token budget of one example.
SHARED_WITH_SFT = {"max_length"}


def check(recipe: Recipe, ds: dict, stage: int, model_config: dict | None, where: str, label: str) -> None:
    """ds: the DeepSpeed template merged with deepspeed.overrides (label names it)."""
    check_training(recipe, where)
    check_precision(recipe, model_config, where)
    check_task(recipe, where)
    check_speed_options(recipe, model_config, stage, where)
    zero, lora = ds.get("zero_optimization", {}), recipe.lora
    if lora and lora.quantize != "none" and stage == 3:
        raise RecipeError(f"{where}: lora.quantize {lora.quantize} (QLoRA) cannot run with ZeRO-3 ({label}); "
                          "use deepspeed.config zero2")
    if lora and stage == 3 and not zero.get("stage3_gather_16bit_weights_on_model_save", False):
        raise RecipeError(f"{where}: LoRA with ZeRO-3 saves empty adapters unless "
                          f"zero_optimization.stage3_gather_16bit_weights_on_model_save is true ({label}); set it in "
                          "deepspeed.overrides")
    if ds_config.offload(ds)[1] and stage != 3:
        raise RecipeError(f"{label}: zero_optimization.offload_param needs stage 3 (stage is {stage})")
    check_lora_targets(recipe, model_config, where)
    ds_fields.check(ds, recipe.deepspeed.overrides, where, label)
    for option in recipe.slurm.sbatch:
        if "\n" in option or not option.startswith("-"):
            fail(where, "slurm.sbatch", f"{option!r} is not one sbatch option like --mem=0")
    grace, limit = recipe.slurm.signal_grace, recipe.slurm.time
    if grace and limit and grace >= seconds(limit):  # USR1 at once: every requeue trains a step and requeues again
        fail(where, "slurm.signal_grace", f"is {grace} s, which does not fit inside slurm.time {limit} "
             f"({seconds(limit)} s): give a smaller grace, a longer time, or signal_grace 0")


def seconds(limit: str) -> int:
    """A Slurm time limit in seconds: MM, MM:SS, HH:MM:SS, or with days D-HH, D-HH:MM, D-HH:MM:SS."""
    days, _, clock = limit.rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    h, m, s = (parts + [0, 0])[:3] if days else {1: [0, *parts, 0], 2: [0, *parts], 3: parts}[len(parts)]
    return int(days or 0) * 86400 + h * 3600 + m * 60 + s


def check_training(recipe: Recipe, where: str) -> None:
    t = recipe.training
    if t.get("bf16") and t.get("fp16"):
        fail(where, "training.bf16", "and training.fp16 are both true; pick one")
    if not recipe.data.train:
        fail(where, "data.train", "needs at least one dataset")
    if recipe.lora and recipe.model.init == "random":
        fail(where, "model.init", "is random, but LoRA adapts a pretrained model: a random base could not be "
             "merged with the adapter later; use init: pretrained")
    report_to = t.get("report_to") or []
    if "wandb" in ([report_to] if isinstance(report_to, str) else report_to):
        fail(where, "training.report_to", "includes wandb; W&B is set up by the wandb section (one run per job, "
             "resumed with the job): remove it from report_to")
    if t.get("eval_strategy", "no") != "no" and not recipe.data.eval and not recipe.data.eval_fraction:
        fail(where, "training.eval_strategy", "asks for evaluation but there is no data.eval and "
             "data.eval_fraction is 0")
    # Resume, consolidation and retention go by the newest complete checkpoint, and the last step must write one
    if (strategy := str(ds_config.training_value(recipe, "save_strategy")).lower()) in ("no", "best"):
        fail(where, "training.save_strategy", f"is {strategy}, so the last step is not saved: the run could not be "
             "consolidated, or known to be finished; use steps (with save_steps) or epoch")
    if t.get("load_best_model_at_end"):
        fail(where, "training.load_best_model_at_end", "is not supported: consolidation takes the newest complete "
             "checkpoint and retention keeps the newest; remove it, and consolidate the checkpoint you want with "
             "launcher consolidate RUN_DIR/checkpoints/checkpoint-N OUTPUT")


def check_precision(recipe: Recipe, config: dict | None, where: str) -> None:
    """Precisions that train differently from what they say. recipe.training holds bf16 and fp16 as
    ds_config.resolve settled them."""
    t, m = recipe.training, recipe.model
    for key in ("bf16", "fp16"):  # one DeepSpeed engine trains and evaluates, in one precision
        if t.get(f"{key}_full_eval") and not t.get(key):
            fail(where, f"training.{key}_full_eval", f"is true but training.{key} is off: under DeepSpeed the model "
                 f"evaluates in the precision it trains in; set training.{key}: true or remove {key}_full_eval")
    if t.get("bf16") or t.get("fp16"):
        return  # DeepSpeed casts the weights to that precision whatever model.dtype loaded
    dtype = m.dtype
    if dtype == "auto" and m.init == "pretrained":  # the checkpoint's own dtype
        dtype = str((config or {}).get("dtype") or (config or {}).get("torch_dtype") or "float32")
    if dtype in ("bfloat16", "float16"):  # ZeRO-3's zero.Init casts to float32, ZeRO-2 keeps half precision
        fail(where, "model.dtype", f"is {m.dtype}" + (f" ({dtype} from the model's config)" if m.dtype == "auto"
             else "") + " but training.bf16 and fp16 are off: ZeRO-3 would train in float32 and ZeRO-2 in pure "
             f"{dtype}; set training.{'bf16' if dtype == 'bfloat16' else 'fp16'}: true (mixed precision) or "
             "model.dtype: float32")
    if (m.attn_implementation or "").startswith("flash_attention"):
        fail(where, "model.attn_implementation", f"is {m.attn_implementation}, which runs in bf16 or fp16 only, "
             "but training.bf16 and fp16 are off (float32): set training.bf16: true (or fp16), or use sdpa")


def check_task(recipe: Recipe, where: str) -> None:
    head, task = recipe.head, recipe.task
    if task == "sft" and (head.labels or head.class_weights is not None or head.stride is not None):
        fail(where, "head", "is for the head tasks (classification, regression, token_classification, "
             "question_answering); this recipe's task is sft")
    if task != "sft":
        for key in recipe.training:
            if key in sft_fields.sft_only() and key not in SHARED_WITH_SFT:
                fail(where, f"training.{key}", f"is an SFT option; task {task} trains with the HF Trainer, which "
                     "ignores it: remove it")
    if head.class_weights is not None and task != "classification":
        fail(where, "head.class_weights", f"weighs the labels of task classification; this recipe's task is {task}")
    if head.stride is not None and task != "question_answering":
        fail(where, "head.stride", f"sets the windows of question_answering contexts; this recipe's task is {task}")
    if task in ("classification", "token_classification"):
        kind = "labels, in id order: [negative, positive]" if task == "classification" else "tags: [O, B-PER, I-PER]"
        if len(head.labels) < 2:
            fail(where, "head.labels", f"must name at least two {kind} for task {task}")
        if len(set(head.labels)) != len(head.labels):
            fail(where, "head.labels", f"has a label twice: {head.labels}")
        weights = head.class_weights
        if isinstance(weights, list) and (len(weights) != len(head.labels) or min(weights) <= 0):
            fail(where, "head.class_weights", f"must be {len(head.labels)} positive numbers (one per label in "
                 "head.labels), or balanced")
    if task in ("regression", "question_answering") and head.labels:
        fail(where, "head.labels", f"names labels, and task {task} has none: " + (
            "regression predicts one number" if task == "regression" else "its answers are spans of the context"))
    if task == "question_answering":
        length = ds_config.training_value(recipe, "max_length") or 0
        if (head.stride or length // 4) * 2 > length:  # the question shares the window too
            fail(where, "head.stride", f"is {head.stride}, more than half of training.max_length {length}: each "
                 "window would advance by less than the part it shares")
    if recipe.freeze and recipe.lora:
        fail(where, "freeze", "and lora both choose what trains: LoRA already freezes the base model; remove one")
    for key in ("score_answers", "eval_answers"):
        if not getattr(recipe.run, key):
            continue
        if task != "sft":
            fail(where, f"run.{key}", f"scores generated answers; task {task} predicts labels, which its "
                 "evaluation already scores: remove it")
        if not recipe.data.eval and not recipe.data.eval_fraction:
            fail(where, f"run.{key}", "needs eval rows to answer: give data.eval or data.eval_fraction")
    if recipe.run.log_samples and task != "sft":
        fail(where, "run.log_samples", f"records SFT rows; task {task} trains with the HF Trainer: remove it")
    if recipe.run.score_answers and not recipe.run.consolidate:
        fail(where, "run.score_answers", "answers with the consolidated model: it needs run.consolidate: true")
    if recipe.run.eval_answers and ds_config.training_value(recipe, "eval_strategy") in ("no", None):
        fail(where, "run.eval_answers", "scores the answers at each evaluation, and this recipe never evaluates: "
             "set training.eval_strategy (steps, with training.eval_steps, or epoch)")


def check_speed_options(recipe: Recipe, config: dict | None, stage: int, where: str) -> None:
    """Packing, the chunked loss, Liger and checkpointing variants: combinations TRL or the libraries under it would
    refuse on every rank after the queue, or that would train something other than what the recipe says."""
    t, lora = recipe.training, recipe.lora
    if t.get("padding_free") and not t.get("packing") and ds_config.training_value(recipe, "max_length") is not None:
        fail(where, "training.padding_free", "without packing cannot enforce max_length (TRL refuses it): set "
             "training.packing: true (rows are filled up to max_length), or max_length: null with truncated data")
    if packing.on(t) and (cause := packing.mixing_cause((config or {}).get("model_type"))):
        key = "training.packing" if t.get("packing") else "training.padding_free"
        fail(where, key, f"would let packed sequences see each other in this {config.get('model_type')} model: "
             f"{cause}; set {key}: false")
    targets = lora.target_modules if lora and not isinstance(lora.target_modules, str) else []
    if recipe.task == "sft" and any(target.rsplit(".", 1)[-1] == "lm_head" for target in targets):
        fail(where, "lora.target_modules", "includes lm_head, but TRL computes the SFT loss in chunks straight from "
             "lm_head's base weight (its fused LM head), so an adapter there would never train; train lm_head fully "
             "with lora.modules_to_save: [lm_head], or leave it out")
    if (t.get("liger_kernel_config") or {}).get("fused_linear_cross_entropy"):
        fail(where, "training.liger_kernel_config", "sets fused_linear_cross_entropy, which TRL refuses: its own "
             "chunked loss already avoids the full logits; remove it (Liger's other kernels still apply)")
    kwargs = t.get("activation_checkpointing_kwargs") or t.get("gradient_checkpointing_kwargs") or {}
    checkpointing = t.get("activation_checkpointing") or t.get("gradient_checkpointing")
    if lora and stage == 3 and checkpointing and kwargs.get("use_reentrant") is False:
        fail(where, "training.gradient_checkpointing_kwargs", "sets use_reentrant: false, but LoRA under ZeRO-3 "
             "with checkpointing needs reentrant checkpointing (trl #2514: the frozen base has no gradients to "
             "recompute from); remove use_reentrant")


def check_lora_targets(recipe: Recipe, config: dict | None, where: str) -> None:
    """Catch LoRA targets that match nothing now, for known architectures; the worker checks the others."""
    if not recipe.lora or isinstance(recipe.lora.target_modules, str) or config is None:
        return
    try:
        known = memory.lora_targets(config)
    except memory.UnknownArchitecture:
        return
    for target in recipe.lora.target_modules:
        if target.rsplit(".", 1)[-1] not in known:
            raise RecipeError(f"{where}: lora.target_modules '{target}' matches no module of this "
                              f"{config.get('model_type')} model; it has {', '.join(sorted(known))}")
