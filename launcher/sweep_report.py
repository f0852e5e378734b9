"""`sweep_report`: the variants of a sweep (its sweep.json), ranked by a metric read from their trainer_state.json."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from launcher import checkpoints, curves, slurm
from launcher.errors import RecipeError
from launcher.sweep_space import short

MANIFEST = "sweep.json"
_NOT_METRICS = ("_runtime", "_samples_per_second", "_steps_per_second")  # Trainer bookkeeping logged with eval_*


def load_manifest(where: str, hint: str = "") -> tuple[Path, dict[str, Any]]:
    path = Path(where) if Path(where).name == MANIFEST else Path(where) / MANIFEST
    if not path.is_file():
        raise RecipeError(f"{where}: no {MANIFEST} here; give the sweep directory `launcher sweep` printed "
                          "(<run dir>-sweep)")
    try:
        return path.parent, json.loads(path.read_text())
    except ValueError:
        raise RecipeError(f"{path}: not valid JSON{hint}") from None


def status(entry: dict[str, Any], run_dir: Path, state: dict[str, Any]) -> str:
    done = checkpoints.complete(run_dir)
    if done and checkpoints.finished(done[-1]):
        return "finished"
    if entry.get("exit_code") not in (None, 0):
        return f"failed (exit {entry['exit_code']})"
    job_state = entry.get("job") and slurm.job_state(entry["job"])
    if job_state and job_state != "COMPLETED":
        return f"{job_state.lower()} (job {entry['job']})"
    return "incomplete" if state else "not run"


def report(where: str, metric: str | None = None) -> dict[str, Any]:
    """The variants, best first by `metric`; those without it (failed, not run) last, in sweep order."""
    directory, data = load_manifest(where)
    rows, histories = [], {}
    for entry in data["variants"]:
        run_dir = Path(entry["run_dir"])
        if not run_dir.exists() and (directory / entry["name"]).exists():  # the sweep was moved or copied here
            run_dir = directory / entry["name"]
        state = {}  # the loss history: written beside the checkpoints when training ends, else the newest one's
        for saved in [checkpoints.directory(run_dir), *reversed(checkpoints.listing(run_dir))]:
            with contextlib.suppress(OSError, ValueError):
                state = json.loads((saved / "trainer_state.json").read_text()) or {}
                break
        histories[entry["name"]] = state.get("log_history", [])
        # each logged key's last value (loss, eval_loss, train_loss, ...)
        values = {k: v for e in state.get("log_history", []) for k, v in e.items()
                  if isinstance(v, (int, float)) and k not in ("step", "epoch")}
        evals = {k: v for k, v in values.items() if k.startswith("eval_") and not k.endswith(_NOT_METRICS)}
        rows.append({"variant": entry["name"], "overrides": entry["overrides"], "run_dir": str(run_dir),
                     "status": status(entry, run_dir, state), "steps": state.get("global_step"),
                     "max_steps": state.get("max_steps"), "loss": values.get("loss"), "eval": evals, "values": values})
    logged = sorted({k for row in rows for k in row["values"]})
    if metric is None:
        metric = "eval_loss" if "eval_loss" in logged else "loss"
    elif logged and metric not in logged:
        raise RecipeError(f"{directory}: no variant logged {metric!r}; logged: {', '.join(logged)}")
    lower = "loss" in metric
    ranked = sorted((r for r in rows if metric in r["values"]), key=lambda r: r["values"][metric], reverse=not lower)
    for rank, row in enumerate(ranked, 1):
        row["rank"] = rank
    for row in rows:
        row["metric"] = row.pop("values").get(metric)
    return {"sweep": str(directory), "name": data.get("name"), "metric": metric,
            "better": "lower" if lower else "higher", "variants": [*ranked, *(r for r in rows if "rank" not in r)],
            "curves": curves.compare(histories, metric, directory / curves.FILE)}


def render_report(result: dict[str, Any]) -> str:
    number = lambda value: "-" if value is None else f"{value:.4g}"
    metric, variants = result["metric"], result["variants"]
    evals = ["eval_loss"] if any("eval_loss" in r["eval"] for r in variants) else []
    extra = [metric] if metric not in ("loss", "eval_loss") else []
    lines = [["#", "variant", "steps", "loss", *evals, *extra, "status", "overrides"]]
    lines += [[str(r.get("rank", "-")), r["variant"], "-" if r["steps"] is None else f"{r['steps']}/{r['max_steps']}",
               number(r["loss"]), *(number(r["eval"].get(k)) for k in evals), *(number(r["metric"]) for _ in extra),
               r["status"], " ".join(f"{k}={short(v)}" for k, v in r["overrides"].items())] for r in variants]
    widths = [max(len(row[i]) for row in lines) for i in range(len(lines[0]))]
    table = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in lines]
    title = f"sweep {result['sweep']}: {len(variants)} variants, ranked by {metric} ({result['better']} is better)"
    return "\n".join([title, *table, result["curves"]])
