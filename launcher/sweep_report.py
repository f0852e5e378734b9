"""`sweep_report`: the variants of a sweep (its sweep.json), ranked by a metric read from their trainer_state.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from launcher import checkpoints
from launcher.errors import RecipeError
from launcher.sweep_space import short

MANIFEST = "sweep.json"
# Trainer bookkeeping logged with the eval metrics, not results.
_NOT_METRICS = ("_runtime", "_samples_per_second", "_steps_per_second")


def load_manifest(where: str) -> tuple[Path, dict[str, Any]]:
    path = Path(where)
    path = path if path.name == MANIFEST else path / MANIFEST
    if not path.is_file():
        raise RecipeError(f"{where}: no {MANIFEST} here; give the sweep directory `launcher sweep` printed "
                          "(<run dir>-sweep)")
    try:
        return path.parent, json.loads(path.read_text())
    except ValueError:
        raise RecipeError(f"{path}: not valid JSON") from None


def trainer_state(run_dir: Path) -> dict[str, Any] | None:
    """The loss history: written beside the checkpoints when training ends, else the newest checkpoint's."""
    candidates = [checkpoints.directory(run_dir) / "trainer_state.json",
                  *(c / "trainer_state.json" for c in reversed(checkpoints.listing(run_dir)))]
    for path in candidates:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            continue
    return None


def last_values(state: dict[str, Any] | None) -> dict[str, float]:
    """Each logged key's last value (loss, eval_loss, train_loss, ...)."""
    out: dict[str, float] = {}
    for entry in (state or {}).get("log_history", []):
        out.update({k: v for k, v in entry.items() if isinstance(v, (int, float)) and k not in ("step", "epoch")})
    return out


def status(entry: dict[str, Any], run_dir: Path, state: dict[str, Any] | None) -> str:
    done = checkpoints.complete(run_dir)
    if done and checkpoints.finished(done[-1]):
        return "finished"
    if entry.get("exit_code") not in (None, 0):
        return f"failed (exit {entry['exit_code']})"
    if entry.get("job"):
        from launcher import slurm

        state_now = slurm.job_state(entry["job"])
        if state_now and state_now != "COMPLETED":
            return f"{state_now.lower()} (job {entry['job']})"
    return "incomplete" if state else "not run"


def report(where: str, metric: str | None = None) -> dict[str, Any]:
    """The variants, best first by `metric`; those without it (failed, not run) last, in sweep order."""
    directory, data = load_manifest(where)
    rows = []
    for entry in data["variants"]:
        run_dir = Path(entry["run_dir"])
        if not run_dir.exists() and (directory / entry["name"]).exists():  # the sweep was moved or copied here
            run_dir = directory / entry["name"]
        state = trainer_state(run_dir)
        values = last_values(state)
        evals = {k: v for k, v in values.items() if k.startswith("eval_") and not k.endswith(_NOT_METRICS)}
        rows.append({"variant": entry["name"], "overrides": entry["overrides"], "run_dir": str(run_dir),
                     "status": status(entry, run_dir, state), "steps": state.get("global_step") if state else None,
                     "max_steps": state.get("max_steps") if state else None, "loss": values.get("loss"),
                     "eval": evals, "values": values})
    logged = sorted({k for row in rows for k in row["values"]})
    if metric is None:
        metric = "eval_loss" if "eval_loss" in logged else "loss"
    elif logged and metric not in logged:
        raise RecipeError(f"{directory}: no variant logged {metric!r}; logged: {', '.join(logged)}")
    lower = "loss" in metric
    ranked = sorted((r for r in rows if metric in r["values"]), key=lambda r: r["values"][metric], reverse=not lower)
    unranked = [r for r in rows if metric not in r["values"]]
    for rank, row in enumerate(ranked, 1):
        row["rank"] = rank
    for row in rows:
        row["metric"] = row["values"].pop(metric, None)
        row.pop("values")
    return {"sweep": str(directory), "name": data.get("name"), "metric": metric,
            "better": "lower" if lower else "higher", "variants": [*ranked, *unranked]}


def render_report(result: dict[str, Any]) -> str:
    metric = result["metric"]
    evals = any("eval_loss" in r["eval"] for r in result["variants"])
    extra = [metric] if metric not in ("loss", "eval_loss") else []
    lines = [["#", "variant", "steps", "loss", *(["eval_loss"] if evals else []), *extra, "status", "overrides"]]
    for r in result["variants"]:
        steps = f"{r['steps']}/{r['max_steps']}" if r["steps"] is not None else "-"
        lines.append([str(r.get("rank", "-")), r["variant"], steps, _number(r["loss"]),
                      *([_number(r["eval"].get("eval_loss"))] if evals else []),
                      *([_number(r["metric"])] if extra else []), r["status"],
                      " ".join(f"{k}={short(v)}" for k, v in r["overrides"].items())])
    widths = [max(len(row[i]) for row in lines) for i in range(len(lines[0]))]
    table = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in lines]
    title = (f"sweep {result['sweep']}: {len(result['variants'])} variants, ranked by {metric} "
             f"({result['better']} is better)")
    return "\n".join([title, *table])


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"
