"""A hub model's files, fetched by each rank before it joins the process group. The group's collectives time out
after 30 minutes, and a first multi-node run with node-local caches can spend longer than that downloading a large
model while ranks that already have it wait. The ranks of a node fetch at once; huggingface_hub's file locks make
that one download per cache. `launch` and `submit` say beforehand whether this host's cache has the files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from launcher.errors import RecipeError

# config, safetensors weights, tokenizer and chat template; not the .bin/.pth/.msgpack/.onnx copies many repos hold
PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


def hub_id(recipe) -> str | None:
    """The model's hub id, when its weights come from the hub."""
    ref = recipe.model.name_or_path
    return None if recipe.model.init == "random" or Path(ref).exists() else ref


def cached(ref: str) -> bool:
    """Whether this host's HF cache holds the config and every safetensors file of the model."""
    from huggingface_hub import try_to_load_from_cache

    def local(name: str) -> str | None:
        found = try_to_load_from_cache(ref, name)
        return found if isinstance(found, str) else None

    if local("config.json") is None:
        return False
    if index := local("model.safetensors.index.json"):
        shards = set(json.loads(Path(index).read_text()).get("weight_map", {}).values())
        return bool(shards) and all(local(shard) for shard in shards)
    return local("model.safetensors") is not None


def describe(recipe) -> str | None:
    if (ref := hub_id(recipe)) is None:
        return None
    if cached(ref):
        return f"weights: {ref} is in this host's Hugging Face cache"
    if offline():  # the ranks would fail in fetch, each, after starting: say it once, here
        raise RecipeError(_unreachable(ref))
    return (f"weights: {ref} is not in this host's Hugging Face cache; each node's ranks download it before they "
            "join (a node-local cache downloads once per node)")


def fetch(recipe) -> None:
    ref = hub_id(recipe)
    if ref is None or cached(ref):
        return
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        snapshot_download(ref, allow_patterns=PATTERNS)
    except LocalEntryNotFoundError:  # HF_HUB_OFFLINE, or no network on the compute node
        raise RecipeError(_unreachable(ref)) from None


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _unreachable(ref: str) -> str:
    return (f"model.name_or_path {ref}: not in this host's Hugging Face cache and the hub cannot be reached "
            f"(offline); download it first, e.g. `hf download {ref}`, into a cache every node reads (HF_HOME)")
