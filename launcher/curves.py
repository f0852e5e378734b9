"""<run dir>/curves.png: the training loss, the eval loss and the eval metrics against the step, from the trainer's log
history; and one plot comparing a sweep's variants. matplotlib with its non-interactive backend (Agg: no display);
without matplotlib installed, a run still trains and says where the plot would have been."""

from __future__ import annotations

from pathlib import Path

FILE = "curves.png"
# eval_* keys that are not a metric of the model
NOT_METRICS = {"eval_loss", "eval_runtime", "eval_samples_per_second", "eval_steps_per_second", "eval_perplexity",
               "eval_num_tokens", "eval_entropy"}


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def missing(out: Path) -> str:
    return f"curves: not plotted (pip install matplotlib); they would be in {out}"


def save(plt, fig, out: Path) -> str:
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return f"curves:        {out}"


def series(history: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(e["step"], e[key]) for e in history if isinstance(e.get(key), (int, float)) and "step" in e]
    return [s for s, _ in points], [v for _, v in points]


def write(history: list[dict], out: Path, title: str) -> str:
    """Plot a run's log history into OUT; returns the line to print (where it is, or why it is not)."""
    plt = pyplot()
    if plt is None:
        return missing(out)
    metrics = sorted({k for e in history for k in e if k.startswith("eval_") and k not in NOT_METRICS
                      and isinstance(e[k], (int, float))})
    fig, axes = plt.subplots(1, 2 if metrics else 1, figsize=(11 if metrics else 6, 4), squeeze=False)
    losses = axes[0][0]
    for key, label, style in (("loss", "training loss", "-"), ("eval_loss", "eval loss", "o-")):
        steps, values = series(history, key)
        if steps:
            losses.plot(steps, values, style, label=label)
    losses.set(xlabel="step", ylabel="loss", title=title)
    losses.legend()
    if metrics:
        scores = axes[0][1]
        for key in metrics:
            scores.plot(*series(history, key), "o-", label=key[len("eval_"):])
        scores.set(xlabel="step", title="eval metrics")
        scores.legend()
    return save(plt, fig, out)


def compare(variants: dict[str, list[dict]], metric: str, out: Path) -> str:
    """One plot of a sweep: METRIC against the step, a line per variant."""
    plt = pyplot()
    if plt is None:
        return missing(out)
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, history in variants.items():
        steps, values = series(history, metric)
        if steps:
            ax.plot(steps, values, "o-" if metric.startswith("eval_") else "-", label=name)
    ax.set(xlabel="step", ylabel=metric, title=f"sweep: {metric}")
    ax.legend(fontsize="small")
    return save(plt, fig, out)
