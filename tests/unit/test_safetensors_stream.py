"""The streaming safetensors writer produces files the safetensors library reads back exactly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from launcher.safetensors_stream import plan_shards, write_model


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_round_trip_through_the_safetensors_library(tmp_path, dtype):
    generator = torch.Generator().manual_seed(0)
    tensors = {f"layer.{i}.weight": torch.randn(7, 3 + i, generator=generator) for i in range(6)}
    tensors["scalar_like"] = torch.randn(1, generator=generator)
    items = [(n, tuple(t.shape), (lambda t=t: [t.reshape(-1)[:5], t.reshape(-1)[5:]])) for n, t in tensors.items()]
    write_model(items, tmp_path, dtype, shard_bytes=100, progress=lambda _: None)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and files[-1].endswith(f"of-{len(files):05d}.safetensors")
    loaded = {}
    for name in files:
        loaded.update(load_file(str(tmp_path / name)))
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert loaded[name].dtype == getattr(torch, dtype)
        assert torch.equal(loaded[name], tensor.to(getattr(torch, dtype)))
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in loaded.values())


def test_a_tensor_larger_than_a_shard_gets_a_shard_of_its_own():
    shards = plan_shards([("a", (10,)), ("big", (1000,)), ("b", (10,))], "float32", shard_bytes=100)
    assert [[n for n, _ in s] for s in shards] == [["a"], ["big"], ["b"]]
