"""Classification and regression heads: rows tokenized for the HF Trainer, class weights, and the metrics that
training, `launcher evaluate` and sweep reports share (accuracy, macro precision / recall / F1; MSE, MAE)."""

from __future__ import annotations

from collections import Counter

import numpy as np

from launcher.data import label_id


def target(value, task: str, labels: list[str]) -> float | int:
    return float(value) if task == "regression" else label_id(value, labels)


def class_weights(recipe, train_set) -> list[float] | None:
    """The recipe's weights, or balanced ones: n / (classes x rows of the class), as scikit-learn defines them."""
    if recipe.head.class_weights != "balanced":
        return recipe.head.class_weights
    labels = recipe.head.labels
    seen = Counter(label_id(v, labels) for v in train_set["label"])
    return [seen.total() / (len(labels) * seen[i]) if seen[i] else 0.0 for i in range(len(labels))]


def head_loss(task: str, weights: list[float] | None):
    """The Trainer's compute_loss_func: cross-entropy (with class weights if any) or squared error, summed and
    divided by the labelled rows (or tokens: -100 marks the others) of the whole batch (all accumulation steps and
    ranks), which the Trainer passes; in evaluation, by those of the batch.

    Needed even without weights: the Trainer takes any model whose forward has **kwargs (BERT's classifier does)
    to normalise its loss that way, multiplies the loss by the number of ranks, and so would double a 2-rank run's
    loss and gradients when the model returns a plain per-rank mean."""
    import torch
    import torch.nn.functional as F

    def loss(outputs, labels, num_items_in_batch=None):
        logits = outputs["logits"]
        if task == "regression":
            total = F.mse_loss(logits.view(-1), labels.view(-1).to(logits.dtype), reduction="sum")
        else:
            w = None if weights is None else torch.tensor(weights, dtype=logits.dtype, device=logits.device)
            total = F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1), weight=w, reduction="sum")
        return total / (num_items_in_batch if num_items_in_batch is not None else (labels != -100).sum())

    return loss


def classification_metrics(eval_pred) -> dict[str, float]:
    """Accuracy and macro-averaged precision, recall and F1 (a class never predicted has precision 0)."""
    logits = np.asarray(eval_pred[0])
    return scores(logits.argmax(-1), np.asarray(eval_pred[1]), logits.shape[-1])


def scores(predicted: np.ndarray, labels: np.ndarray, classes: int) -> dict[str, float]:
    c = np.arange(classes)[:, None]  # one row per class
    tp = ((predicted == c) & (labels == c)).sum(1)
    p, r = tp / np.maximum((predicted == c).sum(1), 1), tp / np.maximum((labels == c).sum(1), 1)
    f1 = np.divide(2 * p * r, p + r, out=np.zeros(classes), where=p + r > 0)
    return {"accuracy": float(np.mean(predicted == labels)), "precision": float(np.mean(p)),
            "recall": float(np.mean(r)), "f1": float(np.mean(f1))}


def regression_metrics(eval_pred) -> dict[str, float]:
    predicted, labels = np.asarray(eval_pred[0]).reshape(-1), np.asarray(eval_pred[1]).reshape(-1)
    return {"mse": float(np.mean((predicted - labels) ** 2)), "mae": float(np.mean(np.abs(predicted - labels)))}


def make_trainer(recipe, model, args, tokenizer, train_set, eval_set, callbacks, max_length: int):
    from transformers import DataCollatorWithPadding

    def encode(ds):
        return ds.map(lambda rows: {**tokenizer(rows["text"], truncation=True, max_length=max_length),
                                    "labels": [target(v, recipe.task, recipe.head.labels) for v in rows["label"]]},
                      batched=True, remove_columns=ds.column_names, desc="tokenizing")

    weights = class_weights(recipe, train_set) if recipe.task == "classification" else None
    metrics = regression_metrics if recipe.task == "regression" else classification_metrics
    return build_trainer(model, args, tokenizer, train_set, eval_set, callbacks, encode,
                         DataCollatorWithPadding(tokenizer), metrics, head_loss(recipe.task, weights))


def build_trainer(model, args, tokenizer, train_set, eval_set, callbacks, encode, collator, metrics, loss):
    """The HF Trainer of a head task, on its rows as ENCODE turns them into features."""
    from transformers import Trainer

    if model.config.pad_token_id is None:  # decoder models have no pad token; batching needs one
        model.config.pad_token_id = tokenizer.pad_token_id
    with args.main_process_first(desc="tokenizing"):  # rank 0 fills the datasets cache, the others read it
        train = encode(train_set)
        evaluation = encode(eval_set) if eval_set is not None else None
    return Trainer(model=model, args=args, train_dataset=train, eval_dataset=evaluation, processing_class=tokenizer,
                   data_collator=collator, compute_metrics=metrics, compute_loss_func=loss, callbacks=callbacks)
