"""`launcher train RECIPE --dry_run [--tiny]`: every stage of a real run, in minutes, before the queue.

The recipe's model, data and configs, but 3 steps on the first 64 rows, into a throwaway run directory
(<output_dir>-dryrun-<time>); then the checkpoint is consolidated, reloaded and asked to generate. Prints one line
per stage, PASS or FAIL with the number that matters, and exits non-zero naming the first stage that failed.
--tiny swaps in the same architecture at a toy size (launcher/tiny.py): no weights, no GPU needed.
"""

from __future__ import annotations

import contextlib
import copy
import math
import resource
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

from launcher import checkpoints, data, ds_config, freeze, modeling, tiny
from launcher import plan as plans
from launcher import recipe as recipes
from launcher.errors import EXIT_BAD_INPUT, RecipeError
from launcher.topology import Topology

STEPS = 3
ROWS = 64
EVAL_ROWS = 16
NEW_TOKENS = 8
CPU_MICRO_BATCH = 2
SHOWN_CHARS = 700  # of the rendered example: the report stays about one screen


class StageFailed(Exception):
    def __init__(self, stage: str, message: str, bad_input: bool):
        super().__init__(message)
        self.stage, self.message, self.bad_input = stage, message, bad_input


class Report:
    """Stage lines in order; a failing stage raises StageFailed out of `stage()` with its message."""

    def __init__(self):
        self.lines: list[str] = []
        self.notes: list[str] = []
        self.run_dir: Path | None = None  # once it exists, a failing stage's traceback is saved there

    def add(self, stage: str, text: str, ok: bool = True) -> None:
        self.lines.append(f"{'PASS' if ok else 'FAIL'}  {stage:<15} {text}")

    def note(self, text: str) -> None:
        self.notes.append(text)

    @contextlib.contextmanager
    def stage(self, name: str):
        try:
            yield
        except StageFailed:
            raise
        except Exception as err:  # any error ends the dry run at this stage, said in one line
            message = (str(err).strip().splitlines() or [type(err).__name__])[0][:400]
            if not isinstance(err, RecipeError):
                message = f"{type(err).__name__}: {message}"
                if self.run_dir is not None and self.run_dir.is_dir():
                    saved = self.run_dir / "dry-run.traceback"
                    saved.write_text(traceback.format_exc())
                    message += f" [traceback: {saved}]"
            raise StageFailed(name, message, isinstance(err, RecipeError)) from err

    def fail(self, name: str, message: str) -> None:
        raise StageFailed(name, message, True)

    def render(self) -> str:
        notes = [f"note  {n}" for n in self.notes]
        return "\n".join(["--- dry run report", *notes, *self.lines])


def run(recipe_path: str, overrides: dict, use_tiny: bool, nproc_per_node: int | None = None,
        nnodes: int | None = None) -> None:
    from launcher.train import distributed_env

    warnings.filterwarnings("ignore", category=FutureWarning)
    _, world = distributed_env()
    if world != 1:
        raise RecipeError(f"--dry_run runs as one process; this one was started as one of {world} ranks")
    report = Report()
    started = time.time()
    try:
        _dry_run(recipe_path, overrides, use_tiny, (nproc_per_node, nnodes), report)
    except StageFailed as err:
        report.add(err.stage, err.message, ok=False)
        print(report.render(), flush=True)
        print(f"error: dry run failed at stage '{err.stage}': {err.message}", file=sys.stderr, flush=True)
        sys.exit(EXIT_BAD_INPUT if err.bad_input else 1)
    print(report.render() + f"\ndry run passed in {time.time() - started:.0f} s", flush=True)


def _dry_run(recipe_path: str, overrides: dict, use_tiny: bool, ranks: tuple, report: Report) -> None:
    # --- recipe: validated and planned exactly as `plan` does, for the real run's topology
    with report.stage("recipe valid"):
        topo = real_topology(recipes.load(recipe_path, overrides), *ranks)
        planned = plans.make(recipe_path, overrides, topo)
    recipe = planned.recipe
    report.add("recipe valid", f"{recipe_path}; real run: {planned.batch} on {topo}")
    if any(k.startswith("data.") for k in overrides):
        report.note("data from the command line: " + ", ".join(f"--{k}={v}" for k, v in overrides.items()
                                                                 if k.startswith("data.")))

    import torch

    on_gpu = torch.cuda.is_available()
    dry = copy.deepcopy(recipe)
    run_dir = Path(f"{recipe.run.output_dir}-dryrun-{time.strftime('%Y%m%d-%H%M%S')}")
    dry.run.output_dir, dry.run.resume, dry.run.global_batch_size, dry.wandb = str(run_dir), "never", None, None
    for change in shrink_run(dry) + ([] if on_gpu else cpu_fallbacks(dry)):
        report.note(change)

    # --- tiny model: the recipe's architecture at a toy size, saved where the recipe's model was
    if use_tiny:
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

    import datasets
    import deepspeed
    import transformers
    from transformers import set_seed
    from trl import SFTConfig

    datasets.disable_progress_bars()  # the report is the output: no bars, no per-step log dicts
    transformers.utils.logging.disable_progress_bar()

    from launcher.train import start_run_dir

    seed = ds_config.training_value(dry, "seed")
    with report.stage("recipe valid"):  # the dry run's own changes must still make a valid run
        ds, _ = ds_config.resolve(dry, 1, recipes.model_config(dry, recipe_path), recipe_path)
    run_dir.mkdir(parents=True, exist_ok=True)
    report.run_dir = run_dir
    start_run_dir(run_dir, dry, ds, None)

    # --- data: every dataset read and checked as the real run reads it, then the first rows
    with report.stage("dataset"):
        tokenizer = modeling.load_tokenizer(dry)
        train_all, eval_all = data.load(dry, recipe_path, seed)
    train_set = train_all.select(range(min(ROWS, len(train_all))))
    eval_set = eval_all.select(range(min(EVAL_ROWS, len(eval_all)))) if eval_all is not None else None
    report.add("dataset", f"{len(train_all):,} train rows" + (f", {len(eval_all):,} eval rows" if eval_all else "")
               + f"; the dry run uses the first {len(train_set)}" + (f" and {len(eval_set)}" if eval_set else ""))

    # --- training arguments, model and LoRA, as the worker builds them
    if not on_gpu:  # one process: DeepSpeed's shared-memory collectives are of no use, and are a C++ build (minutes)
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    with report.stage("model"):
        args = SFTConfig(output_dir=str(checkpoints.directory(run_dir)), deepspeed=ds, use_cpu=not on_gpu,
                         **dry.training)
        deepspeed.init_distributed()
        set_seed(seed)
        model = modeling.load_model(dry, on_gpu)
        if dry.task == "sft":
            modeling.stop_at_end_of_turn(model.generation_config, tokenizer)
        freeze.apply(model, dry.freeze, recipe_path)
    stages, reload = (_sft_stages, _reload_sft) if dry.task == "sft" else (_head_stages, _reload_head)
    trainer = stages(report, dry, recipe_path, model, args, tokenizer, train_set, eval_set, run_dir, ds)
    _train_and_consolidate(report, trainer, planned, run_dir, on_gpu, eval_set is not None)
    reload(report, run_dir / "final", train_set[0], dry.task)


def _reload_sft(report, final: Path, row: dict, task: str) -> None:
    with report.stage("reload"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        reloaded = AutoModelForCausalLM.from_pretrained(final)
        final_tokenizer = AutoTokenizer.from_pretrained(final)
    report.add("reload", f"{type(reloaded).__name__}, {sum(p.numel() for p in reloaded.parameters()):,} params")
    with report.stage("generate"):
        prompt, text = generate(reloaded, final_tokenizer, row)
    report.add("generate", f"{prompt!r} -> {text}")


def _reload_head(report, final: Path, row: dict, task: str) -> None:
    with report.stage("reload"):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        reloaded = AutoModelForSequenceClassification.from_pretrained(final)
        final_tokenizer = AutoTokenizer.from_pretrained(final)
    report.add("reload", f"{type(reloaded).__name__}, {sum(p.numel() for p in reloaded.parameters()):,} params"
               + (f", labels {list(reloaded.config.id2label.values())}" if task == "classification" else ""))
    with report.stage("predict"):
        report.add("predict", predict(reloaded, final_tokenizer, row, task))


def _sft_stages(report, dry, recipe_path, model, args, tokenizer, train_set, eval_set, run_dir, ds):
    """LoRA, then tokenization by TRL itself (the prepared dataset is what training sees) and its loss tokens."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import SFTTrainer

    from launcher.callbacks import CompleteCheckpoints

    with report.stage("LoRA targets"):
        peft_config = modeling.lora_config(dry, model, recipe_path)
    with report.stage("tokenize"):
        stage = ds_config.zero_stage(ds, dry.deepspeed.config)
        try:
            trainer = SFTTrainer(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set,
                                 processing_class=tokenizer, peft_config=peft_config,
                                 callbacks=[CompleteCheckpoints(run_dir, 1, stage, None)])
        except (RuntimeError, ValueError) as err:
            if "no assistant tokens" in str(err):
                report.fail("loss tokens", "0% of tokens carry loss: under assistant_only_loss the chat template "
                            "marks no assistant token ({% generation %} block empty or missing); TRL: "
                            + str(err).splitlines()[0][:160])
            if "not training-compatible" in str(err):
                report.fail("loss tokens", "assistant_only_loss needs {% generation %} markers around the assistant "
                            "turns, and TRL has no marked version of this chat template: give model.tokenizer one "
                            "that has them, or set training.assistant_only_loss false (loss on every token)")
            raise
        for printer in (PrinterCallback, ProgressCallback):
            trainer.remove_callback(printer)
        untruncated = trainer._prepare_dataset(train_set, trainer.processing_class, _no_truncation(args),
                                               packing=False, formatting_func=None, dataset_name="dry-run lengths")
    with report.stage("loss tokens"):
        rows_in = None if args.packing else len(train_set)
        token_stats(report, untruncated, trainer.train_dataset, args.max_length, rows_in)
        report.lines.append("      example (loss on «...»): " + render_example(tokenizer, trainer.train_dataset))
    with report.stage("LoRA targets"):
        lora_line(report, trainer.model, dry)
    return trainer


def _head_stages(report, dry, recipe_path, model, args, tokenizer, train_set, eval_set, run_dir, ds):
    """A classification or regression head: the HF Trainer, token lengths, labels seen, what trains."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from launcher import classify
    from launcher.callbacks import CompleteCheckpoints

    max_length = ds_config.training_value(dry, "max_length")
    stage = ds_config.zero_stage(ds, dry.deepspeed.config)
    with report.stage("tokenize"):
        trainer = classify.make_trainer(dry, model, args, tokenizer, train_set, eval_set,
                                        [CompleteCheckpoints(run_dir, 1, stage, None)], max_length)
        for printer in (PrinterCallback, ProgressCallback):
            trainer.remove_callback(printer)
        lengths = sorted(len(ids) for ids in tokenizer(list(train_set["text"]))["input_ids"])
    over = sum(n > max_length for n in lengths)
    line = (f"min {lengths[0]} / median {statistics.median(lengths):.0f} / max {lengths[-1]} against max_length "
            f"{max_length}; {over / len(lengths):.0%} truncated")
    if over == len(lengths):
        report.fail("tokens/example", line + ": every example is cut at max_length; raise training.max_length or "
                    "shorten the data")
    report.add("tokens/example", line)
    with report.stage("labels"):
        if dry.task == "classification":
            seen = {name: 0 for name in dry.head.labels}
            for value in train_set["label"]:
                seen[dry.head.labels[data.label_id(value, dry.head.labels)]] += 1
            text = ", ".join(f"{name} {n}" for name, n in seen.items())
            missing = [name for name, n in seen.items() if n == 0]
            report.add("labels", f"in the first {len(train_set)} rows: {text}"
                       + (f" (none of {', '.join(missing)} here)" if missing else ""))
        else:
            values = [float(v) for v in train_set["label"]]
            report.add("labels", f"regression targets from {min(values):.4g} to {max(values):.4g}")
        report.lines.append(f"      example: {train_set[0]['text'][:SHOWN_CHARS]!r} -> {train_set[0]['label']!r}")
    report.add("trainable", freeze.describe(modeling.parameter_count(trainer.model, trainable_only=True),
                                            modeling.parameter_count(trainer.model)))
    return trainer


def _train_and_consolidate(report, trainer, planned, run_dir: Path, on_gpu: bool, has_eval: bool) -> None:
    """A few steps, the last one saving a checkpoint; then the run's end product, consolidated."""
    with report.stage("train"):
        trainer.train()
        metrics = trainer.evaluate() if has_eval else {}
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    if trainer.state.global_step != STEPS or not losses or not all(math.isfinite(x) for x in losses):
        report.fail("train", f"{trainer.state.global_step} steps, losses {losses}: expected {STEPS} finite")
    evaluated = f", eval loss {metrics['eval_loss']:.3f}" if "eval_loss" in metrics else ""
    report.add("train", f"{STEPS} steps, loss {' -> '.join(f'{x:.3f}' for x in losses)}{evaluated}")
    report.add("memory", f"measured {measured_memory(on_gpu)}; real run estimate: {planned.memory}")
    done = checkpoints.complete(run_dir)
    if not done:
        report.fail("checkpoint", f"no checkpoint with the {checkpoints.MARKER} marker under {run_dir}")
    report.add("checkpoint", f"{done[-1]} ({checkpoints.MARKER} written)")
    with report.stage("consolidate"):
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        from launcher.consolidate import consolidate

        unset_hf_deepspeed_config()
        final = consolidate(str(run_dir), str(run_dir / "final"), overwrite=True, progress=lambda _: None)
    report.add("consolidate", f"{final} ({sum(f.stat().st_size for f in final.glob('*.safetensors')) / 1e6:.1f} MB)")


def predict(model, tokenizer, row: dict, task: str) -> str:
    """The reloaded head's answer for the first row."""
    import torch

    with torch.no_grad():
        logits = model(**tokenizer(row["text"], return_tensors="pt", truncation=True)).logits[0]
    answer = f"{logits.item():.4g}" if task == "regression" else model.config.id2label[int(logits.argmax())]
    return f"{row['text'][:80]!r} -> {answer} (label {row['label']!r})"


def real_topology(recipe, nproc_per_node: int | None, nnodes: int | None) -> Topology:
    """The real run's ranks, for the batch check and memory estimate: the flags, else the recipe's slurm section,
    else one rank."""
    per_node = int(nproc_per_node or recipe.slurm.gpus_per_node or 1)
    return Topology((per_node,) * int(nnodes or (recipe.slurm.nodes if recipe.slurm.gpus_per_node else 1)))


def shrink_run(dry) -> list[str]:
    """A few steps, a checkpoint at the last, no evaluation during training, nothing reported."""
    t = dry.training
    t.update(max_steps=STEPS, save_steps=STEPS, save_strategy="steps", logging_steps=1, eval_strategy="no",
             gradient_accumulation_steps=1, report_to="none", disable_tqdm=True, save_total_limit=None)
    return [f"dry run: {STEPS} steps on the first {ROWS} rows, gradient accumulation 1, a checkpoint at step "
            f"{STEPS}, one evaluation on {EVAL_ROWS} rows at the end; run directory {dry.run.output_dir}"]


def cpu_fallbacks(dry) -> list[str]:
    """What cannot run on a CPU, replaced; each change is reported."""
    changes = []
    if dry.training.get("bf16") or dry.training.get("fp16"):
        dry.training.update(bf16=False, fp16=False)
        changes.append("CPU: bf16/fp16 off (training in float32)")
    if dry.model.dtype in ("bfloat16", "float16"):
        changes.append(f"CPU: model.dtype {dry.model.dtype} -> float32")
        dry.model.dtype = "float32"
    if dry.model.attn_implementation and dry.model.attn_implementation.startswith("flash_attention"):
        changes.append(f"CPU: attn_implementation {dry.model.attn_implementation} -> sdpa")
        dry.model.attn_implementation = "sdpa"
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
    cpu = {}
    for key in ("offload_optimizer", "offload_param"):
        if zero.get(key, {}).get("device", "none") != "none":
            cpu.setdefault("zero_optimization", {})[key] = {"device": "none"}
    if cpu:
        changes.append("CPU: ZeRO offload off (the weights are in CPU memory already; DeepSpeedCPUAdam would need "
                       "a C++ build)")
    if "optimizer" in template:
        cpu["optimizer"] = {"params": {"torch_adam": True}}
        changes.append("CPU: DeepSpeed's AdamW runs as torch.optim.AdamW (its fused kernels need a build)")
    dry.deepspeed.overrides = ds_config.merge(dry.deepspeed.overrides, cpu)
    return changes


def _no_truncation(args):
    untruncated = copy.copy(args)
    untruncated.max_length = None
    return untruncated


def token_stats(report: Report, untruncated, prepared, max_length: int | None, rows: int | None) -> None:
    """Lengths before truncation against max_length, and the share of tokens carrying loss after it.
    rows: how many went in, to count those TRL dropped (None when packing joins them)."""
    lengths = sorted(len(ids) for ids in untruncated["input_ids"])
    limit = max_length or math.inf
    over = sum(n > limit for n in lengths)
    line = (f"min {lengths[0]} / median {statistics.median(lengths):.0f} / max {lengths[-1]} against max_length "
            f"{max_length}; {over / len(lengths):.0%} truncated")
    dropped = rows - len(prepared) if rows is not None else 0
    if dropped:
        line += f"; TRL dropped {dropped} rows left without loss tokens by truncation"
    if over == len(lengths) or len(prepared) == 0:
        report.fail("tokens/example", line + ": every example is cut at max_length; raise training.max_length or "
                    "shorten the data")
    report.add("tokens/example", line)
    total = sum(len(labels) for labels in prepared["labels"])
    carrying = sum(label != -100 for labels in prepared["labels"] for label in labels)
    share = carrying / total if total else 0.0
    text = f"{share:.1%} of {total:,} tokens carry loss"
    if share == 0:
        report.fail("loss tokens", text + ": the chat template or completion-only masking masks everything")
    if share == 1:
        text += " (every token: the model also learns the prompts; assistant_only_loss is off)"
    report.add("loss tokens", text)


def render_example(tokenizer, prepared) -> str:
    """The shortest prepared example decoded, with the spans that carry loss in «»."""
    index = min(range(len(prepared)), key=lambda i: len(prepared[i]["input_ids"]))
    row = prepared[index]
    pieces, span, carrying = [], [], None
    for token, label in zip(row["input_ids"], row["labels"], strict=False):
        if (label != -100) != carrying and span:
            pieces.append(_span(tokenizer, span, carrying))
            span = []
        carrying = label != -100
        span.append(token)
    pieces.append(_span(tokenizer, span, carrying))
    text = "".join(pieces).replace("\n", "\\n")
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS // 2] + " [...] " + text[-SHOWN_CHARS // 2 :]


def _span(tokenizer, ids: list[int], carrying: bool) -> str:
    text = tokenizer.decode(ids)
    return f"«{text}»" if carrying else text


def lora_line(report: Report, model, recipe) -> None:
    total, trainable = modeling.parameter_count(model), modeling.parameter_count(model, trainable_only=True)
    if recipe.lora is None:
        report.add("LoRA targets", f"none (full fine-tune); {trainable:,} of {total:,} parameters trainable")
        return
    adapted = [name for name, module in model.named_modules() if hasattr(module, "lora_A")]
    kinds = sorted({name.rsplit(".", 1)[-1] for name in adapted})
    if not adapted:
        report.fail("LoRA targets", f"lora.target_modules {recipe.lora.target_modules} adapted no module")
    report.add("LoRA targets", f"{len(adapted)} modules ({', '.join(kinds)}); {trainable:,} of {total:,} parameters "
               f"trainable ({trainable / total:.2%})")


def measured_memory(on_gpu: bool) -> str:
    if on_gpu:
        import torch

        return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB GPU peak (torch.cuda.max_memory_allocated)"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB peak RSS (CPU)"


def generate(model, tokenizer, row: dict) -> tuple[str, str]:
    """Greedy tokens for the first prompt of the data: the user turns before the first answer, or the prompt."""
    if "messages" in row:
        turns = row["messages"]
        first_answer = next(i for i, t in enumerate(turns) if t["role"] == "assistant")
        prompt_turns, shown = turns[:first_answer], turns[first_answer - 1]["content"] if first_answer else ""
    elif isinstance(row.get("prompt"), list):
        prompt_turns, shown = row["prompt"], row["prompt"][-1]["content"]
    else:
        prompt_turns, shown = None, (row.get("prompt") or row.get("text", ""))[:80]
    if prompt_turns is not None and tokenizer.chat_template:
        inputs = tokenizer.apply_chat_template(prompt_turns, add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True)
    else:
        inputs = tokenizer(shown, return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    new = output[0, inputs["input_ids"].shape[1] :]
    if len(new) == 0:
        raise RuntimeError("generation produced no tokens")
    text = tokenizer.decode(new, skip_special_tokens=False)
    return shown, repr(text) if text.strip() else f"{text!r}, token ids {new.tolist()}"
