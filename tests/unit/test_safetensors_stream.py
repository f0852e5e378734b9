"""The streaming safetensors writer produces files the safetensors library reads back exactly, whether the values
come as tensors or as runs of values left in a file (a checkpoint's), and whether shards are written one at a time
or several at once."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from launcher.safetensors_stream import FileSlice, plan_shards, write_model


def items(tensors: dict, tmp_path, source: str) -> list:
    """(name, shape, read) for write_model: each tensor in two chunks, as tensors or as FileSlices of a file where
    the values sit at unaligned offsets in SOURCE's dtype (bfloat16: a frozen parameter saved in training dtype)."""
    if source == "tensor":
        return [(n, tuple(t.shape), (lambda t=t: [t.reshape(-1)[:5], t.reshape(-1)[5:]])) for n, t in tensors.items()]
    path, blob, out = tmp_path / "values.bin", bytearray(b"pad"), []
    for name, tensor in tensors.items():
        start, values = len(blob), tensor.to(getattr(torch, source)).reshape(-1)
        blob += values.view(torch.uint8).numpy().tobytes()
        count, size = values.numel(), values.element_size()
        first = min(5, count)
        out.append((name, tuple(tensor.shape), lambda s=start, n=count, f=first, k=size: [
            FileSlice(str(path), s, source, f), FileSlice(str(path), s + f * k, source, n - f)]))
    path.write_bytes(bytes(blob))
    return out


@pytest.mark.parametrize("source", ["tensor", "float32", "bfloat16"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_round_trip_through_the_safetensors_library(tmp_path, dtype, source):
    generator = torch.Generator().manual_seed(0)
    tensors = {f"layer.{i}.weight": torch.randn(7, 3 + i, generator=generator) for i in range(12)}
    tensors["scalar_like"] = torch.randn(1, generator=generator)
    written = {}
    for workers in (1, 4):  # in parallel: the same bytes as one shard at a time
        out = tmp_path / f"workers{workers}"
        out.mkdir()
        write_model(items(tensors, tmp_path, source), out, dtype, shard_bytes=100, progress=lambda _: None,
                    workers=workers)
        written[workers] = {f.name: f.read_bytes() for f in sorted(out.iterdir())}
    assert written[1] == written[4]
    out = tmp_path / "workers4"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 4 and files[-1].endswith(f"of-{len(files):05d}.safetensors")
    loaded = {}
    for name in files:  # each shard holds exactly the tensors the index sends a loader to it for
        shard = load_file(str(out / name))
        assert set(shard) == {n for n, f in index["weight_map"].items() if f == name}
        loaded.update(shard)
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        expected = tensor if source == "tensor" else tensor.to(getattr(torch, source))
        assert loaded[name].dtype == getattr(torch, dtype)
        assert torch.equal(loaded[name], expected.to(getattr(torch, dtype)))
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in loaded.values())


def test_a_failing_shard_stops_the_others_and_its_error_is_raised(tmp_path):
    calls = []

    def read(i: int) -> list:
        calls.append(i)
        if i == 3:
            raise OSError("disk full")
        return [torch.zeros(25)]

    tensors = [(f"t{i}", (25,), lambda i=i: read(i)) for i in range(40)]
    with pytest.raises(OSError, match="disk full"):
        write_model(tensors, tmp_path, "float32", shard_bytes=100, progress=lambda _: None, workers=2)
    assert not (tmp_path / "model.safetensors.index.json").exists()
    assert len(calls) < 40  # the shards not started were cancelled, the running one stopped


def test_a_tensor_larger_than_a_shard_gets_a_shard_of_its_own():
    shards = plan_shards([("a", (10,)), ("big", (1000,)), ("b", (10,))], "float32", shard_bytes=100)
    assert [[n for n, _ in s] for s in shards] == [["a"], ["big"], ["b"]]
