"""The checkpoint reader's own unpickler: torch.save files read without torch.load, tensors located in the file
rather than loaded, and anything but plain data refused."""

from __future__ import annotations

import os
from collections import OrderedDict

import pytest
import torch

from launcher.errors import RecipeError
from launcher.zero_checkpoint import Stored, load


def values(stored: Stored) -> torch.Tensor:
    return stored.values(0, stored.numel(), "t").tensor().view(stored.shape)


def test_tensors_are_found_where_torch_save_put_them(tmp_path):
    base = torch.randn(40, generator=torch.Generator().manual_seed(0))
    tagged = torch.randn(3, 4)
    tagged.note = "kept by _rebuild_from_type_v2"  # a tensor with attributes, like DeepSpeed's flat groups
    saved = {"view": base[7:19], "whole": base, "bf16": base.bfloat16()[3:], "shape": torch.Size([2, 3]),
             "param": torch.nn.Parameter(torch.ones(2, 2)), "tagged": tagged, "nested": OrderedDict(a=[1, {2}], b=None),
             "grad": torch.randn(5, requires_grad=True)}
    torch.save(saved, tmp_path / "f.pt")
    read = load(tmp_path / "f.pt")
    assert read["shape"] == (2, 3) and read["nested"] == OrderedDict(a=[1, {2}], b=None)
    for name in ("view", "whole", "bf16", "param", "tagged", "grad"):
        assert torch.equal(values(read[name]), saved[name].detach()), name  # shared storage, offsets, dtypes
    assert read["bf16"].dtype == "bfloat16" and read["view"].offset == read["whole"].offset + 7 * 4


def test_a_strided_tensor_or_a_run_past_its_end_is_refused(tmp_path):
    torch.save({"t": torch.randn(4, 6).t(), "small": torch.randn(3)}, tmp_path / "f.pt")
    read = load(tmp_path / "f.pt")
    with pytest.raises(RecipeError, match="non-contiguous"):
        read["t"].values(0, 24, "t")
    with pytest.raises(RecipeError, match="do not match"):
        read["small"].values(2, 2, "small")


class Payload:
    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickled_code_is_refused_not_run(tmp_path):
    payload = Payload()
    payload.marker = tmp_path / "ran"
    torch.save({"optimizer_state_dict": payload}, tmp_path / "evil.pt")
    with pytest.raises(RecipeError, match="cannot be read as a DeepSpeed checkpoint file .*system.*not allowed"):
        load(tmp_path / "evil.pt")
    assert not payload.marker.exists()
