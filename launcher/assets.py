"""The files the package ships, read through importlib.resources so that an installed wheel finds them too: the Slurm
job template, the DeepSpeed configs a recipe names (`deepspeed: {config: zero3}`) and the dry run's stand-ins.

They live in launcher/shipped/ (package data); in a checkout, ds_configs/, slurm/job.sbatch and recipes/stand-ins/
are symlinks into it, where users look for them.
"""

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


def job_template_path() -> Path:
    return shipped() / "job.sbatch"


def job_template() -> str:
    """The job script template `submit` renders (slurm/job.sbatch in a checkout)."""
    return job_template_path().read_text()


def stand_ins() -> Path:
    """The dry run's offline stand-ins: tokenizers, chat templates, sample data (recipes/stand-ins in a checkout)."""
    return shipped() / "stand-ins"


def ds_config_names() -> list[str]:
    """The shipped DeepSpeed configs, by the names a recipe gives them: zero2, zero3, ..."""
    return sorted(p.stem for p in (shipped() / "ds_configs").glob("*.json"))


def is_name(ref: str) -> bool:
    """Whether deepspeed.config names a shipped config (zero3) rather than giving a path (ds_configs/zero3.json)."""
    return "/" not in ref and not ref.endswith(".json")


def ds_config(ref: str, where: str = "recipe") -> str:
    """deepspeed.config as a path: a shipped config's, for its name; a path is returned unchanged. An unknown name
    is a RecipeError."""
    if not is_name(ref):
        return ref
    if ref not in ds_config_names():
        schema.fail(where, "deepspeed.config", f"'{ref}' is neither a shipped config ({', '.join(ds_config_names())})"
                    " nor a path to a JSON file")
    return str(shipped() / "ds_configs" / f"{ref}.json")
