"""The README.md model card of a consolidated model: what it was trained from, on what, for how long, how well."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from launcher import curves

HOW = {"sft": "with supervised fine-tuning (TRL SFTTrainer, DeepSpeed ZeRO)",
       "classification": "as a sequence classifier (a new head, HF Trainer, DeepSpeed ZeRO)",
       "regression": "as a sequence regressor (a new one-output head, HF Trainer, DeepSpeed ZeRO)"}


def write(out: Path, checkpoint: Path, steps: int | None) -> None:
    recipe = recipe_of(checkpoint)
    state_file = checkpoint / "trainer_state.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    model = recipe.get("model", {}).get("name_or_path", "unknown")
    data = [d.get("path") for d in recipe.get("data", {}).get("train", [])]
    lora = ", LoRA merged into the base weights (the adapter is in `adapter/`)." if recipe.get("lora") else "."
    lines = [f"# {recipe.get('run', {}).get('name', out.name)}", "",
             f"Fine-tuned from `{model}` {HOW.get(recipe.get('task', 'sft'), HOW['sft'])}{lora}", "",
             f"- data: {', '.join(f'`{d}`' for d in data) or 'unknown'}",
             f"- steps: {steps if steps is not None else state.get('global_step', 'unknown')}",
             f"- checkpoint: `{checkpoint}`"]
    if labels := recipe.get("head", {}).get("labels"):
        lines.append(f"- labels: {', '.join(f'`{label}`' for label in labels)}")
    for key in ("loss", "eval_loss", "eval_accuracy", "eval_f1", "eval_mse"):
        value = next((e[key] for e in reversed(state.get("log_history", [])) if key in e), None)
        if value is not None:
            lines.append(f"- final {key.replace('_', ' ')}: {value:.4f}")
    plot = checkpoint.parent.parent / curves.FILE  # the run directory's, written when training ended
    if plot.is_file():
        shutil.copyfile(plot, out / curves.FILE)
        lines += ["", f"![training and eval curves]({curves.FILE})"]
    if recipe:
        lines += ["", "## Recipe", "", "```yaml", yaml.safe_dump(recipe, sort_keys=False).strip(), "```"]
    (out / "README.md").write_text("\n".join(lines) + "\n")


def recipe_of(checkpoint: Path) -> dict:
    """The resolved recipe of the run a checkpoint belongs to (run_dir/checkpoints/checkpoint-N), if any."""
    for candidate in (checkpoint.parent.parent / "recipe.yaml", checkpoint / "recipe.yaml"):
        if candidate.is_file():
            return yaml.safe_load(candidate.read_text()) or {}
    return {}
