"""The files the package ships (launcher/shipped/, package data), read through importlib.resources so that an
installed wheel finds them too: the Slurm job template, the DeepSpeed configs a recipe names (`deepspeed: {config:
zero3}`) and the dry run's stand-ins. In a checkout, ds_configs/, slurm/job.sbatch and recipes/stand-ins/ are symlinks
into it, where users look for them."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from launcher import schema


def shipped() -> Path:
    """launcher/shipped/ on disk (DeepSpeed and transformers are handed paths, so a zipped install cannot serve)."""
    root = resources.files("launcher") / "shipped"
    if not isinstance(root, Path) or not root.is_dir():
        raise RuntimeError(f"launcher's shipped files are not on disk ({root}): install the package unzipped")
    return root


def stand_ins() -> Path:
    """The dry run's offline stand-ins: tokenizers, chat templates, sample data (recipes/stand-ins in a checkout)."""
    return shipped() / "stand-ins"


def ds_config(ref: str, where: str = "recipe") -> str:
    """deepspeed.config as a path: a shipped config's for its name (zero3), a path (ds_configs/zero3.json) as it is.
    An unknown name is a RecipeError."""
    if "/" in ref or ref.endswith(".json"):
        return ref
    names = sorted(p.stem for p in (shipped() / "ds_configs").glob("*.json"))
    if ref not in names:
        schema.fail(where, "deepspeed.config", f"'{ref}' is neither a shipped config ({', '.join(names)})"
                    " nor a path to a JSON file")
    return str(shipped() / "ds_configs" / f"{ref}.json")
