"""Write safetensors shards tensor by tensor: the header is computed from shapes first, then each tensor's bytes are
streamed to disk as it is read, so memory holds one tensor at a time, not one shard.

The safetensors library (like DeepSpeed's zero_to_fp32) needs every tensor of a shard in memory to save it; with
1 GB shards of a 374M model that set its peak memory (see bench/consolidate.py). The format is a little-endian u64
header length, a JSON header of dtype, shape and byte offsets per tensor, then the raw bytes.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

SAFETENSORS_DTYPE = {"float32": ("F32", 4), "bfloat16": ("BF16", 2), "float16": ("F16", 2)}


def plan_shards(shapes: Iterable[tuple[str, tuple[int, ...]]], dtype: str, shard_bytes: int) -> list[list]:
    """Group (name, shape) in order into shards of at most shard_bytes (a larger tensor gets a shard alone)."""
    size = SAFETENSORS_DTYPE[dtype][1]
    shards, used = [[]], 0
    for name, shape in shapes:
        nbytes = math.prod(shape) * size
        if shards[-1] and used + nbytes > shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append((name, tuple(shape)))
        used += nbytes
    return shards if shards[-1] else []


def write_model(tensors: list[tuple[str, tuple[int, ...], Callable]], out: Path, dtype: str, shard_bytes: int,
                progress: Callable[[str], None] = print, after_each: Callable[[], None] | None = None) -> None:
    """tensors: (name, shape, read) in order, read() giving the tensor's values as a list of 1-D chunks (views)."""
    reader = {name: read for name, _, read in tensors}
    shards = plan_shards(((n, s) for n, s, _ in tensors), dtype, shard_bytes)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        total += _write_shard(out / name, shard, reader, dtype, after_each)
        weight_map.update(dict.fromkeys((n for n, _ in shard), name))
        progress(f"  wrote {name} ({len(shard)} tensors)")
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _write_shard(path: Path, shard: list, reader: dict, dtype: str, after_each) -> int:
    import torch

    code, size = SAFETENSORS_DTYPE[dtype]
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in shard:
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + math.prod(shape) * size]}
        offset = header[name]["data_offsets"][1]
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data must start 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded)
        for name, shape in shard:
            written = 0
            for chunk in reader[name]():
                f.write(chunk.to(getattr(torch, dtype)).contiguous().view(torch.uint8).numpy().data)
                written += chunk.numel()
            if written != math.prod(shape):
                raise ValueError(f"{name}: read {written} values, planned {math.prod(shape)}")
            if after_each:
                after_each()
    # No fsync here: launcher/consolidate.py syncs the whole directory once, before renaming it into place.
    return offset
