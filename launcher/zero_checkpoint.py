"""Read a DeepSpeed ZeRO-2/3 checkpoint one tensor at a time, without building the whole state dict.

Every rank's fp32 master weights sit in its optimizer file as flat groups. ZeRO-3 gives each rank a ceil(n/world)
slice of every parameter; ZeRO-2 gives each rank one contiguous slice of each group's flat vector. Either way a
parameter is a list of (rank, group, start, length) pieces, read from memory-mapped files (`weights_only=True`).
"""

from __future__ import annotations

import enum
import math
from collections import namedtuple
from pathlib import Path

from launcher.errors import RecipeError

RELEASE_EVERY = 256 * 2**20  # bytes read through the maps before they are dropped and re-opened

Piece = namedtuple("Piece", "rank group start length")
# pieces: of a trainable parameter, from the optimizer files; empty: a frozen one, from the model-state files
Entry = namedtuple("Entry", "name shape pieces")


class ZeroCheckpoint:
    """The tensors of the `global_stepN/` directory a checkpoint's `latest` file names, in the model's order."""

    def __init__(self, checkpoint: Path):
        latest = checkpoint / "latest"
        if not latest.is_file():
            raise RecipeError(f"{checkpoint}: no 'latest' file; not a DeepSpeed checkpoint directory")
        self.dir = step_dir = checkpoint / latest.read_text().strip()
        if not step_dir.is_dir():
            raise RecipeError(f"{checkpoint}: 'latest' names {step_dir.name}, which does not exist")
        if not (states := sorted(step_dir.glob("*model_states.pt"))):
            raise RecipeError(f"{step_dir}: no *model_states.pt files; not a DeepSpeed checkpoint")
        first = load(states[0])
        self.world = first["dp_world_size"]
        self.stage = 3 if states[0].name.startswith("zero_pp_rank_") else 2
        self.optim_files = [self._rank_file(r, "optim_states.pt") for r in range(self.world)]
        self.model_files = [self._rank_file(r, "model_states.pt") for r in range(self.world)] if self.stage == 3 \
            else [states[0]]
        if (found := len(list(step_dir.glob("*zero_pp_rank_*_optim_states.pt")))) != self.world:
            raise RecipeError(f"{step_dir}: {found} optimizer shard files but the saved world size is {self.world}")
        self.global_steps = first.get("global_steps")
        self.release()
        self.entries = self._entries(first["param_shapes"], first.get("frozen_param_shapes") or {})
        self.release()
        # less the aliases of tied weights: transformers re-ties them when it loads the model
        self.unique = [e for e in self.entries if e.name not in (first.get("shared_params") or {})]

    def _rank_file(self, rank: int, suffix: str) -> Path:
        matches = list(self.dir.glob(f"*zero_pp_rank_{rank}_mp_rank_00_{suffix}"))
        if not matches or not matches[0].is_file():
            raise RecipeError(f"{self.dir}: the checkpoint was saved by {self.world} ranks but rank {rank}'s "
                              f"{suffix} file is missing; it is incomplete")
        return matches[0]

    def _entries(self, param_shapes: list[dict], frozen_shapes: dict) -> list[Entry]:
        out = []
        for group, shapes in enumerate(param_shapes):
            sizes, offset = [self.optim(rank)[group].numel() for rank in range(self.world)], 0
            for name, shape in shapes.items():
                numel = math.prod(shape)
                if numel == 0:
                    raise RecipeError(f"{self.dir}: parameter {name} has zero size; refusing an empty checkpoint")
                out.append(Entry(name, tuple(shape), self._pieces(group, offset, numel, sizes)))
                offset += math.ceil(numel / self.world) if self.stage == 3 else numel
            held = sizes[0] if self.stage == 3 else sum(sizes)
            if offset > held:
                raise RecipeError(f"{self.dir}: parameter shapes need {offset} values in group {group} but the "
                                  f"optimizer files hold {held}; shapes and shards do not match")
        return out + [Entry(name, tuple(shape), ()) for name, shape in frozen_shapes.items()]

    def _pieces(self, group: int, offset: int, numel: int, sizes: list[int]) -> tuple[Piece, ...]:
        if self.stage == 3:  # every rank holds the same-size slice of every parameter, zero-padded at the end
            return tuple(Piece(r, group, offset, math.ceil(numel / self.world)) for r in range(self.world))
        pieces, begin = [], 0  # ZeRO-2: rank r holds [begin, begin + sizes[r]) of the group's flat vector
        for rank, size in enumerate(sizes):
            lo, hi = max(offset, begin), min(offset + numel, begin + size)
            if lo < hi:
                pieces.append(Piece(rank, group, lo - begin, hi - lo))
            begin += size
        return tuple(pieces)

    def optim(self, rank: int):
        if self._optim[rank] is None:
            key = "fp32_flat_groups" if self.stage == 3 else "single_partition_of_fp32_groups"
            self._optim[rank] = load(self.optim_files[rank])["optimizer_state_dict"][key]
        return self._optim[rank]

    def chunks(self, entry: Entry) -> list:
        """1-D views into the memory maps whose concatenation is the parameter (frozen ones in their saved dtype)."""
        if self._mapped_bytes > RELEASE_EVERY:  # enough read through the maps: drop them, bounding resident memory
            self.release()
        if entry.pieces:
            parts = [self.optim(p.rank)[p.group].narrow(0, p.start, p.length) for p in entry.pieces]
        else:
            self._frozen = self._frozen or [load(f).get("frozen_param_fragments") or {} for f in self.model_files]
            parts = [frozen[entry.name].reshape(-1) for frozen in self._frozen]
        out, left = [], math.prod(entry.shape)
        for part in parts:  # ZeRO-3 pads each parameter's last slice: keep only the real values
            if left > 0:
                out.append(part[: min(left, part.numel())])
                left -= out[-1].numel()
        if left:
            raise RecipeError(f"{self.dir}: parameter {entry.name} is missing {left} of its values")
        self._mapped_bytes += sum(c.numel() * c.element_size() for c in out)
        return out

    def release(self) -> None:
        """Drop the memory maps: pages read so far stop counting as this process' resident memory."""
        self._optim, self._frozen, self._mapped_bytes = [None] * self.world, None, 0


# Stand-ins for DeepSpeed's classes, so reading a checkpoint needs no deepspeed import (seconds): its ZeroStageEnum,
# and bookkeeping objects (loss scaler, fragment addresses) that consolidation ignores.
_ZeroStage = enum.IntEnum("_ZeroStage", "disabled optimizer_states gradients weights", start=0)


class _Opaque:
    def __setstate__(self, state):
        self.__dict__.update(state if isinstance(state, dict) else {})


SAFE_GLOBALS = [(_ZeroStage, "deepspeed.runtime.zero.config.ZeroStageEnum")] + [
    (_Opaque, name) for name in ("deepspeed.runtime.fp16.loss_scaler.LossScaler",
                                 "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
                                 "deepspeed.utils.tensor_fragment.fragment_address")]


def load(path: Path) -> dict:
    """torch.load with weights_only=True: tensors and plain data only, with stand-ins for DeepSpeed's classes."""
    import torch

    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # a truncated or foreign file: say which
        reason = str(err).splitlines()[0]
        raise RecipeError(f"{path}: cannot be read as a DeepSpeed checkpoint file ({reason})") from None

