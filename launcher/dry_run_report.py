"""What the dry run prints: its report (one PASS/FAIL line per stage), and the inspections of what the worker's
`build` made: token lengths, the tokens that carry loss, an example, LoRA targets, labels, generated answers."""

from __future__ import annotations

import contextlib
import itertools
import math
import resource
import statistics
import traceback
from pathlib import Path

from launcher import data, ds_config, freeze, modeling
from launcher.errors import RecipeError

NEW_TOKENS = 8
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
        return "\n".join(["--- dry run report", *(f"note  {n}" for n in self.notes), *self.lines])


def inspect_sft(report: Report, dry, built) -> None:
    """What TRL prepared (the dataset training sees): lengths before truncation, the tokens that carry loss, an
    example, and the LoRA adapters."""
    trainer, prepared, tokenizer = built.trainer, built.trainer.train_dataset, built.trainer.processing_class
    with report.stage("loss tokens"):
        lengths = []  # before truncation, the rows rendered as TRL renders them (chat template for conversations)
        for row in built.train_set:
            turns = row.get("messages") or (row["prompt"] + row["completion"] if isinstance(row.get("prompt"), list)
                                            else None)
            ids = (tokenizer(row.get("text") or row["prompt"] + row["completion"]) if turns is None
                   else tokenizer.apply_chat_template(turns, tokenize=True, return_dict=True))["input_ids"]
            lengths.append(len(ids))
        dropped = 0 if trainer.args.packing else len(lengths) - len(prepared)  # by TRL; none to count once packed
        length_line(report, lengths, trainer.args.max_length, dropped)
        total = sum(len(labels) for labels in prepared["labels"])
        share = sum(label != -100 for labels in prepared["labels"] for label in labels) / total if total else 0.0
        text = f"{share:.1%} of {total:,} tokens carry loss"
        if share == 0:
            report.fail("loss tokens", text + ": the chat template or completion-only masking masks everything")
        if share == 1:
            text += " (every token: the model also learns the prompts; assistant_only_loss is off)"
        report.add("loss tokens", text)
        row = min(prepared, key=lambda r: len(r["input_ids"]))  # the shortest example, the loss-carrying spans in «»
        pieces = []
        for carrying, group in itertools.groupby(zip(row["input_ids"], row["labels"], strict=False),
                                                 key=lambda pair: pair[1] != -100):
            text = built.tokenizer.decode([token for token, _ in group])
            pieces.append(f"«{text}»" if carrying else text)
        text = "".join(pieces).replace("\n", "\\n")
        if len(text) > SHOWN_CHARS:
            text = text[: SHOWN_CHARS // 2] + " [...] " + text[-SHOWN_CHARS // 2 :]
        report.lines.append("      example (loss on «...»): " + text)
    with report.stage("LoRA targets"):
        total, trainable = modeling.parameter_count(trainer.model), modeling.parameter_count(trainer.model, True)
        adapted = [name for name, module in trainer.model.named_modules() if hasattr(module, "lora_A")]
        if dry.lora is None:
            report.add("LoRA targets", f"none (full fine-tune); {trainable:,} of {total:,} parameters trainable")
        elif not adapted:
            report.fail("LoRA targets", f"lora.target_modules {dry.lora.target_modules} adapted no module")
        else:
            kinds = sorted({name.rsplit(".", 1)[-1] for name in adapted})
            report.add("LoRA targets", f"{len(adapted)} modules ({', '.join(kinds)}); {trainable:,} of {total:,} "
                       f"parameters trainable ({trainable / total:.2%})")


def inspect_head(report: Report, dry, built) -> None:
    """A task head: token lengths (of the features the trainer built: windows for a reader), labels seen, an
    example, what trains."""
    train_set, labels = built.train_set, dry.head.labels
    lengths = [len(ids) for ids in built.trainer.train_dataset["input_ids"]]
    length_line(report, lengths, ds_config.training_value(dry, "max_length"))
    with report.stage("labels"):
        if dry.task in ("classification", "token_classification"):
            values = train_set["label"] if dry.task == "classification" else [t for ts in train_set["tags"] for t in ts]
            seen = {name: 0 for name in labels}
            for value in values:
                seen[labels[data.label_id(value, labels)]] += 1
            text = ", ".join(f"{name} {n}" for name, n in seen.items())
            missing = [name for name, n in seen.items() if n == 0]
            report.add("labels", f"in the first {len(train_set)} rows: {text}"
                       + (f" (none of {', '.join(missing)} here)" if missing else ""))
        elif dry.task == "regression":
            values = [float(v) for v in train_set["label"]]
            report.add("labels", f"regression targets from {min(values):.4g} to {max(values):.4g}")
        else:
            report.add("labels", f"{len(train_set)} questions read in {len(lengths)} windows")
        report.lines.append(f"      example: {example(train_set[0])}")
    report.add("trainable", freeze.describe(*built.trainable))


def example(row: dict) -> str:
    if "tokens" in row:
        return " ".join(f"{w}/{t}" for w, t in zip(row["tokens"], row["tags"], strict=True))[:SHOWN_CHARS]
    if "question" in row:
        return f"{row['question'][:SHOWN_CHARS]!r} -> {row['answers']['text'][0]!r}"
    return f"{row['text'][:SHOWN_CHARS]!r} -> {row['label']!r}"


def predict(model, tokenizer, row: dict, task: str) -> str:
    """The reloaded head's answer for the first row."""
    import torch

    from launcher import extractive, tagging

    with torch.no_grad():
        if task == "token_classification":
            encoded = tagging.align(tokenizer, {"tokens": [row["tokens"]], "tags": [row["tags"]]},
                                    list(model.config.id2label.values()), tokenizer.model_max_length)
            gold = encoded.pop("labels")
            logits = model(**tokenizer.pad(encoded, return_tensors="pt")).logits.argmax(-1).numpy()
            (tags,), _ = tagging.decode(logits, torch.tensor(gold).numpy(), list(model.config.id2label.values()))
            return f"{' '.join(row['tokens'])[:80]!r} -> {' '.join(tags)} (tags {' '.join(map(str, row['tags']))})"
        if task == "question_answering":
            rows = {k: [row[k]] for k in ("question", "context", "answers")}
            size = getattr(model.config, extractive.CONFIG_KEY, None) or {"max_length": 384, "stride": 96}
            encoded, origin, offsets = extractive.features(tokenizer, rows, size["max_length"], size["stride"])
            out = model(**tokenizer.pad({k: v for k, v in encoded.items() if "_positions" not in k},
                                        return_tensors="pt"))
            (answer,) = extractive.best_answers(out.start_logits.numpy(), out.end_logits.numpy(), origin, offsets,
                                                rows["context"])
            return f"{row['question'][:80]!r} -> {answer!r} (answer {row['answers']['text'][0]!r})"
        logits = model(**tokenizer(row["text"], return_tensors="pt", truncation=True)).logits[0]
    answer = f"{logits.item():.4g}" if task == "regression" else model.config.id2label[int(logits.argmax())]
    return f"{row['text'][:80]!r} -> {answer} (label {row['label']!r})"


def length_line(report: Report, lengths: list[int], max_length: int | None, dropped: int = 0) -> None:
    """Tokens per example before truncation, against max_length; fails when every example would be cut."""
    lengths = sorted(lengths)
    over = sum(n > (max_length or math.inf) for n in lengths)
    line = (f"min {lengths[0]} / median {statistics.median(lengths):.0f} / max {lengths[-1]} against max_length "
            f"{max_length}; {over / len(lengths):.0%} truncated")
    if dropped:
        line += f"; TRL dropped {dropped} rows left without loss tokens by truncation"
    if over == len(lengths) or dropped == len(lengths):
        report.fail("tokens/example", line + ": every example is cut at max_length; raise training.max_length or "
                    "shorten the data")
    report.add("tokens/example", line)


def measured_memory() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB GPU peak (torch.cuda.max_memory_allocated)"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB peak RSS (CPU)"


def generate(model, tokenizer, row: dict) -> str:
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
    new = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)[0, inputs["input_ids"].shape[1] :]
    if len(new) == 0:
        raise RuntimeError("generation produced no tokens")
    text = tokenizer.decode(new, skip_special_tokens=False)
    return f"{shown!r} -> " + (repr(text) if text.strip() else f"{text!r}, token ids {new.tolist()}")


PACKED_SEQUENCES, PACKED_TOKENS = 3, 256  # enough to cross two boundaries; cheap on a CPU with the real model


def inspect_packing(report: Report, dry, built) -> None:
    """Each sequence's loss in a packed row, against its loss alone, on the model as built: a model whose attention
    crosses the boundaries fails here, naming the sequence, before any GPU time."""
    from launcher import packing

    rows, sequences = built.trainer.train_dataset, []
    for row in rows.select(range(min(len(rows), PACKED_SEQUENCES))):  # packed rows hold their sequences' lengths
        start = 0
        for length in row.get("seq_lengths") or [len(row["input_ids"])]:
            sequences.append(row["input_ids"][start:start + length][:PACKED_TOKENS])
            start += length
    sequences = [s for s in sequences if len(s) > 1][:PACKED_SEQUENCES]
    if len(sequences) < 2:
        report.fail("packing", "fewer than two sequences of two or more tokens in the first rows: nothing to check")
    model, pad = built.trainer.model, built.trainer.processing_class.pad_token_id
    with packing.gathered(model):
        losses = packing.compare(model, sequences, pad if pad is not None else 0)
    index, gap = packing.worst(losses)
    attention = getattr(model.config, "_attn_implementation", None) or dry.model.attn_implementation
    if gap > packing.TOLERANCE:
        p, a = losses[index]
        report.fail("packing", f"sequence {index + 1} of {len(losses)} has loss {p:.4f} packed but {a:.4f} alone: "
                    f"this model's {attention} attention lets packed sequences see each other (it ignores where "
                    "position_ids restart); set training.packing: false (and padding_free: false)")
    report.add("packing", f"{len(losses)} sequences ({sum(map(len, sequences))} tokens) in one row: each loss equals "
               f"its loss alone within {packing.TOLERANCE:g} (largest gap {gap:.1e}; {attention} attention)")
