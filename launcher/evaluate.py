"""`launcher evaluate MODEL_DIR --data FILE`: a consolidated model's metrics on a data file (see cli.evaluate), and
for SFT models the answers it generates to every row's prompt, scored against the references (exact match, token
F1), a few shown so a person can see what it does. Classifier labels go by the names kept in the model's id2label,
or by id. A causal LM's loss is the mean per predicted token, over the
tokens a trainer learns by default: the assistant's turns where the chat template marks them ({% generation %}),
else the whole conversation; the completion of prompt/completion rows; all of a text row.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from launcher import answers, classify, extractive, tagging
from launcher.data import load_one
from launcher.errors import RecipeError
from launcher.modeling import LENGTH_KEY, auto_class_for, is_classifier, task_of
from launcher.preflight import GENERATION_MARKERS
from launcher.schema import DatasetSpec


def evaluate(model_dir: str, data: str, split: str = "train", output: str | None = None, batch_size: int = 32,
             max_rows: int | None = None, prompts: int = 3, max_new_tokens: int = 48) -> dict:
    directory = Path(model_dir)
    config = read_config(directory)
    local = Path(data).expanduser()
    if not local.exists() and (local.suffix or data.count("/") != 1):  # nor a hub id (owner/name)
        raise RecipeError(f"command line: --data '{data}' does not exist")
    import datasets

    datasets.disable_progress_bars()  # a bad row's one line must be the only thing said
    spec = DatasetSpec(path=str(local.absolute()) if local.exists() else data, split=split)
    rows = load_one(spec, "command line", "--data", task_of(config), labels_of(config))
    if max_rows:
        rows = rows.select(range(min(max_rows, len(rows))))
    out = Path(output) if output else directory / f"metrics-{Path(data).stem}.json"
    return evaluate_rows(directory, config, rows, str(data), out, batch_size, prompts, max_new_tokens)


def evaluate_rows(directory: Path, config: dict, rows, data: str, out: Path, batch_size: int = 32, prompts: int = 3,
                  max_new_tokens: int = 48) -> dict:
    """The metrics of the model in DIRECTORY on ROWS (loaded rows), printed and written to OUT as JSON; also what a
    run's end scores its eval rows with (train.finish, run.score_answers)."""
    import torch
    from transformers import AutoTokenizer

    classifier, task = is_classifier(config), task_of(config)
    device, dtype = device_and_dtype(config, torch.cuda.is_available())
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
        model = auto_class_for(config).from_pretrained(directory, dtype=getattr(torch, dtype)).to(device).eval()
    except (OSError, ValueError) as err:
        raise RecipeError(f"{directory}: cannot load the model or its tokenizer ({str(err).splitlines()[0]})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    print(f"evaluating {directory} ({config['architectures'][0]}, {dtype} on {device}) on {data}: {len(rows)} rows",
          flush=True)
    with torch.no_grad():
        metrics = (HEAD_METRICS[task](model, tokenizer, rows, task, config, batch_size) if classifier
                   else _lm_metrics(model, tokenizer, rows, prompts, max_new_tokens, batch_size))
    result = {"model": str(directory.absolute()), "data": data, "rows": len(rows), "task": task,
              "device": device, "dtype": dtype, **metrics}
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(render(result) + f"\nwritten: {out}", flush=True)
    return result


def read_config(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.is_file():
        raise RecipeError(f"{directory}: no config.json: not a model directory (give `launcher consolidate`'s "
                          "output, e.g. <run dir>/final)")
    try:
        config = json.loads(path.read_text())
    except ValueError as err:
        raise RecipeError(f"{path}: not valid JSON ({err})") from None
    if not config.get("architectures"):
        raise RecipeError(f"{path}: names no architecture; cannot tell a classifier from a language model")
    return config


def labels_of(config: dict) -> list[str]:
    if task_of(config) not in ("classification", "token_classification"):
        return []
    return [config["id2label"][str(i)] for i in range(len(config.get("id2label", {})))]


def trained_length(config: dict, tokenizer) -> int:
    """What the trainer truncated rows to (the config keeps it); a model trained elsewhere: its tokenizer's limit."""
    return config.get(LENGTH_KEY) or min(tokenizer.model_max_length, 4096)


def device_and_dtype(config: dict, cuda: bool) -> tuple[str, str]:
    """The GPU when there is one, and the dtype the model was saved in (consolidate writes it): an 8B model in fp32
    on the CPU takes hours and 32 GB."""
    return ("cuda" if cuda else "cpu"), config.get("dtype") or config.get("torch_dtype") or "float32"


def _classifier_metrics(model, tokenizer, rows, task: str, config: dict, batch_size: int) -> dict:
    import torch

    labels = labels_of(config)
    outputs, targets = [], []
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        encoded = tokenizer(batch["text"], truncation=True, padding=True, return_tensors="pt",
                            max_length=trained_length(config, tokenizer))
        outputs.append(model(**encoded.to(model.device)).logits.float().cpu())
        targets += [classify.target(v, task, labels) for v in batch["label"]]
    logits = torch.cat(outputs)
    if task == "regression":
        return classify.regression_metrics((logits.numpy(), targets))
    target = torch.tensor(targets)
    return {"loss": torch.nn.functional.cross_entropy(logits, target).item(),
            **classify.scores(logits.argmax(-1).numpy(), target.numpy(), len(labels)), "labels": labels}


def _tagger_metrics(model, tokenizer, rows, task: str, config: dict, batch_size: int) -> dict:
    """The trainer's own alignment (each word's first sub-token) and entity scores (launcher/tagging.py)."""
    import torch

    labels, length = labels_of(config), trained_length(config, tokenizer)
    predicted, gold, total, count = [], [], 0.0, 0
    for start in range(0, len(rows), batch_size):
        encoded = tagging.align(tokenizer, rows[start : start + batch_size], labels, length)
        target = encoded.pop("labels")
        batch = tokenizer.pad(encoded, return_tensors="pt").to(model.device)
        logits = model(**batch).logits.float().cpu()
        target = torch.tensor([t + [tagging.IGNORED] * (logits.shape[1] - len(t)) for t in target])
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum").item()
        count += int((target != tagging.IGNORED).sum())
        p, g = tagging.decode(logits.argmax(-1).numpy(), target.numpy(), labels)
        predicted, gold = predicted + p, gold + g
    return {"loss": total / max(count, 1), **tagging.scores(predicted, gold), "labels": labels}


def _reader_metrics(model, tokenizer, rows, task: str, config: dict, batch_size: int) -> dict:
    """The windows the model was trained with (its config keeps them) and the trainer's best-span search."""
    import numpy as np

    size = config.get(extractive.CONFIG_KEY) or {"max_length": min(tokenizer.model_max_length, 512)}
    size.setdefault("stride", size["max_length"] // 4)
    encoded, origin, offsets = extractive.features(tokenizer, rows, size["max_length"], size["stride"], "--data")
    starts, ends = [], []
    for first in range(0, len(origin), batch_size):
        window = {k: v[first : first + batch_size] for k, v in encoded.items() if not k.endswith("_positions")}
        out = model(**tokenizer.pad(window, return_tensors="pt").to(model.device))
        starts += list(out.start_logits.float().cpu().numpy())
        ends += list(out.end_logits.float().cpu().numpy())
    width = max(len(s) for s in starts)
    pad = lambda xs: np.stack([np.pad(x, (0, width - len(x)), constant_values=-100) for x in xs])  # noqa: E731
    predicted = extractive.best_answers(pad(starts), pad(ends), origin, offsets, rows["context"])
    return {**extractive.scores(predicted, [a["text"] for a in rows["answers"]]), "windows": len(origin),
            "samples": [{"question": q, "reference": a["text"][0], "predicted": p}
                        for q, a, p in zip(rows["question"][:3], rows["answers"][:3], predicted, strict=False)]}


HEAD_METRICS = {"classification": _classifier_metrics, "regression": _classifier_metrics,
                "token_classification": _tagger_metrics, "question_answering": _reader_metrics}


def _lm_metrics(model, tokenizer, rows, prompts: int, max_new_tokens: int, batch_size: int) -> dict:
    """Loss and perplexity over the scored tokens; then greedy answers to every row's prompt (a conversation without
    its last assistant turn, or a prompt/completion row's prompt), scored against the references (launcher/answers.py);
    the first `prompts` are shown. One progress bar covers both passes."""
    import torch
    from tqdm.auto import tqdm

    marked = bool(GENERATION_MARKERS.search(tokenizer.chat_template or ""))
    rows = [_one_conversation(r) for r in rows]
    scored = [(ids, mask) for ids, mask in (_scored(tokenizer, row, marked) for row in rows) if sum(mask[1:])]
    if not scored:
        raise RecipeError("--data: no row has a token to score (empty completions, or a template that marks none)")
    asked = questions(tokenizer, rows)
    batches = -(-len(scored) // batch_size) + -(-len(asked) // batch_size)
    total, count, pad = 0.0, 0, tokenizer.pad_token_id
    with tqdm(total=batches, desc="evaluating", unit="batch", leave=False) as bar:
        for start in range(0, len(scored), batch_size):
            batch = scored[start : start + batch_size]
            width = max(len(ids) for ids, _ in batch)  # right padding: the real tokens keep their positions
            ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in batch], device=model.device)
            attention = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in batch], device=model.device)
            labels = torch.tensor([[t if m else -100 for t, m in zip(i[1:], m[1:], strict=True)]
                                   + [-100] * (width - len(i)) for i, m in batch], device=model.device)
            logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1]  # -100: context, padding
            for row_logits, row_labels in zip(logits, labels, strict=True):  # one row's fp32 logits at a time
                total += torch.nn.functional.cross_entropy(row_logits.float(), row_labels, reduction="sum").item()
            count += int((labels != -100).sum())
            bar.update()
        generated = answers.generate(model, tokenizer, [ids for ids, _, _ in asked], batch_size, max_new_tokens,
                                     bar.update)
    samples = [{"prompt": prompt, "reference": reference, "generated": text}
               for (_, prompt, reference), text in zip(asked, generated, strict=True)]
    loss = total / count
    scores = answers.scores([(s["generated"], s["reference"]) for s in samples])
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count, **scores,
            "samples": samples[: max(prompts, 0)]}


def questions(tokenizer, rows) -> list[tuple[list[int], str, str]]:
    """(prompt ids, prompt, reference) of each row that has an answer to give: a conversation's last assistant turn,
    a prompt/completion row's completion; text rows have none. What the answers are scored on, here and during
    training (run.eval_answers)."""
    return [q for q in (_prompt(tokenizer, _one_conversation(row)) for row in rows) if q]


def _one_conversation(row: dict) -> dict:
    """Conversational prompt/completion rows (lists of turns) are one conversation."""
    return {"messages": [*row["prompt"], *row["completion"]]} if isinstance(row.get("prompt"), list) else row


def _scored(tokenizer, row: dict, marked: bool) -> tuple[list[int], list[int]]:
    """A row's ids, and which of them are scored (1) or context (0)."""
    if "messages" in row:
        out = tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=marked)
        ids = list(out["input_ids"])
        return ids, list(out["assistant_masks"]) if marked else [1] * len(ids)
    if "prompt" in row:
        prompt = tokenizer(row["prompt"])["input_ids"]
        completion = tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
        return prompt + completion, [0] * len(prompt) + [1] * len(completion)
    ids = tokenizer(row["text"])["input_ids"]
    return ids, [1] * len(ids)


def _prompt(tokenizer, row: dict) -> tuple[list[int], str, str] | None:
    """The ids to generate from, the prompt and the reference answer; None for a text row."""
    if "messages" in row:
        turns = row["messages"]
        cut = max(i for i, t in enumerate(turns) if t["role"] == "assistant")
        context = turns[:cut]
        ids = tokenizer.apply_chat_template(context, add_generation_prompt=True, tokenize=True, return_dict=True
                                            )["input_ids"]
        return list(ids), context[-1]["content"] if context else "", turns[cut]["content"]
    if "prompt" in row:
        return tokenizer(row["prompt"])["input_ids"], row["prompt"], row["completion"]
    return None


def render(result: dict) -> str:
    skip = {"model", "data", "samples", "labels", "task"}
    rows = [(k, f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in result.items() if k not in skip]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    for sample in result.get("samples", []):
        lines += ["", *(f"{key + ':':<11}{value}" for key, value in sample.items())]
    return "\n".join(lines)
