"""Write safetensors shards tensor by tensor: the header is computed from shapes first, then each tensor's bytes are
streamed to disk as they are read, so memory holds a small buffer (or one tensor) per shard being written, not a shard.

The safetensors library (like DeepSpeed's zero_to_fp32) needs every tensor of a shard in memory to save it; with
1 GB shards of a 374M model that set its peak memory (see bench/consolidate.py). The format is a little-endian u64
header length, a JSON header of dtype, shape and byte offsets per tensor, then the raw bytes.

A tensor's values come either as torch tensors (the LoRA merge) or as FileSlices, runs of values left in the
checkpoint's files (a full fine-tune, launcher/zero_checkpoint.py): those are copied through a 256 KiB buffer, cast
on the way if needed, and torch is imported only for a cast. Shards are written by a few threads at once (file
copies and torch casts release the GIL) and each is fsynced as soon as it is complete, so the disk is flushing one
shard while the next is written.
"""

from __future__ import annotations

import json
import math
import os
import struct
import threading
from collections import namedtuple
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

SAFETENSORS_DTYPE = {"float32": ("F32", 4), "bfloat16": ("BF16", 2), "float16": ("F16", 2)}
ITEMSIZE = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}  # dtypes a FileSlice may hold
# Bytes read per system call: small enough to stay in the CPU's cache between the read and the write (1 MiB blocks
# copy 2.5x slower on this VM), large enough that the calls cost nothing next to the copy.
BLOCK = 256 * 2**10
# Values per cast: no more than torch's grain size (32768), so that torch casts a block in the calling thread. A larger
# one is split across torch's threads, whose wake-up costs more than the cast (0.3 ms against 7 us per block here,
# and 20 s instead of 4 to cast this 374M model to bf16 on a loaded machine): the shards' threads are the parallelism.
CAST_VALUES = 2**15
# Shards written at once. Memory: WORKERS * (BLOCK + a cast buffer) for file slices; WORKERS tensors (each with its
# cast) for tensors handed in whole, as the LoRA merge does. A few streams fill a file system; more only add memory.
WORKERS = 4


class FileSlice(namedtuple("FileSlice", "path offset dtype count")):
    """COUNT values of DTYPE (torch's name, e.g. float32) from byte OFFSET of the file PATH, read only when copied."""

    def tensor(self):
        """The values in memory, as a 1-D torch tensor."""
        import torch

        data = bytearray(self.count * ITEMSIZE[self.dtype])
        fd = os.open(self.path, os.O_RDONLY)
        try:
            _pread(fd, memoryview(data), self.offset, self.path)
        finally:
            os.close(fd)
        return torch.frombuffer(data, dtype=getattr(torch, self.dtype))


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
                progress: Callable[[str], None] = print, after_each: Callable[[], None] | None = None,
                workers: int = WORKERS) -> None:
    """tensors: (name, shape, read) in order, read() giving the tensor's values as a list of 1-D chunks (tensors
    or FileSlices). after_each runs after every tensor (in the writing threads) and may raise to stop the writing."""
    reader = {name: read for name, _, read in tensors}
    shards = plan_shards(((n, s) for n, s, _ in tensors), dtype, shard_bytes)
    names = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    jobs = [(out / name, shard) for name, shard in zip(names, shards, strict=True)]
    sizes = _write_shards(jobs, reader, dtype, after_each, workers, progress)
    weight_map = {tensor: name for name, shard in zip(names, shards, strict=True) for tensor, _ in shard}
    index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _write_shards(jobs: list, reader: dict, dtype: str, after_each, workers: int, progress) -> list[int]:
    """Write the (path, shard) jobs, WORKERS at a time, and return their sizes. The first failure stops the other
    shards at their next tensor and is the error raised; nothing is still writing when this returns or raises."""
    stop, failures = threading.Event(), []

    def check() -> None:
        if stop.is_set():
            raise _Stopped
        if after_each:
            after_each()

    def write(path: Path, shard: list) -> int:
        if stop.is_set():  # a shard that starts after a failure reads nothing
            raise _Stopped
        try:
            return _write_shard(path, shard, reader, dtype, check)
        except _Stopped:
            raise
        except BaseException as err:
            failures.append(err)
            stop.set()
            raise

    pool, sizes = ThreadPoolExecutor(max(1, min(workers, len(jobs))), thread_name_prefix="shard"), []
    try:
        futures = [pool.submit(write, path, shard) for path, shard in jobs]
        for (path, shard), future in zip(jobs, futures, strict=True):
            try:
                sizes.append(future.result())
            except _Stopped:
                raise failures[0] from None  # the error that stopped this shard
            progress(f"  wrote {path.name} ({len(shard)} tensors)")
    except BaseException:
        stop.set()  # e.g. Ctrl-C while waiting: the writing threads stop too
        raise
    finally:
        pool.shutdown(cancel_futures=True)  # and waits for the running ones
    return sizes


class _Stopped(Exception):
    """Raised in a shard's thread when another shard failed first."""


def _write_shard(path: Path, shard: list, reader: dict, dtype: str, check: Callable[[], None]) -> int:
    code, size = SAFETENSORS_DTYPE[dtype]
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in shard:
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + math.prod(shape) * size]}
        offset = header[name]["data_offsets"][1]
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data must start 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded)
        copier = _Copier(f, dtype)
        for name, shape in shard:
            written = sum(copier.append(chunk) for chunk in reader[name]())
            if written != math.prod(shape):
                raise ValueError(f"{name}: read {written} values, planned {math.prod(shape)}")
            check()
        f.flush()
        # Now rather than only at the end: the disk flushes this shard while the others are written.
        # launcher/consolidate.py still syncs the whole directory (metadata too) before renaming it into place.
        os.fsync(f.fileno())
    return offset


class _Copier:
    """Appends values, cast to DTYPE, to an open shard; file slices go through one reused BLOCK-sized buffer, read
    with pread: no memory map, whose page faults cost more than the copy, and memory that does not grow with the
    tensor."""

    def __init__(self, f, dtype: str):
        self.f, self.dtype, self.block, self.casts = f, dtype, bytearray(BLOCK), {}

    def append(self, chunk) -> int:
        if isinstance(chunk, FileSlice):
            self._copy(chunk)
            return chunk.count
        import torch

        self.f.write(chunk.to(getattr(torch, self.dtype)).contiguous().view(torch.uint8).numpy().data)
        return chunk.numel()

    def _copy(self, piece: FileSlice) -> None:
        cast = None if piece.dtype == self.dtype else self._cast(piece.dtype)
        step = BLOCK // ITEMSIZE[piece.dtype] if cast is None else CAST_VALUES  # values per read
        fd = os.open(piece.path, os.O_RDONLY)
        try:
            for start in range(0, piece.count, step):
                count = min(step, piece.count - start)
                view = memoryview(self.block)[: count * ITEMSIZE[piece.dtype]]
                _pread(fd, view, piece.offset + start * ITEMSIZE[piece.dtype], piece.path)
                self.f.write(view if cast is None else cast(count))
        finally:
            os.close(fd)

    def _cast(self, source: str) -> Callable[[int], memoryview]:
        """count -> the first COUNT values of the block, cast by torch (the same bytes the tensor path writes)."""
        import torch

        if source not in self.casts:
            values = torch.frombuffer(self.block, dtype=getattr(torch, source))
            self.casts[source] = (values, torch.empty(len(values), dtype=getattr(torch, self.dtype)))
        values, cast = self.casts[source]
        return lambda count: cast[:count].copy_(values[:count]).view(torch.uint8).numpy().data


def _pread(fd: int, view: memoryview, offset: int, path: str) -> None:
    """Fill VIEW from byte OFFSET of the file."""
    while view:
        n = os.preadv(fd, [view], offset)
        if n == 0:
            raise ValueError(f"{path}: ends before byte {offset}; the file is truncated")
        view, offset = view[n:], offset + n
