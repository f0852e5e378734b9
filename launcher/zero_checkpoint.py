"""Read a DeepSpeed ZeRO-2/3 checkpoint one tensor at a time, without building the whole state dict.

Every rank's fp32 master weights sit in its optimizer file as flat groups. ZeRO-3 gives each rank a ceil(n/world)
slice of every parameter; ZeRO-2 gives each rank one contiguous slice of each group's flat vector. Either way a
parameter is a list of (rank, group, start, length) pieces, read from memory-mapped files (`weights_only=True`).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from pathlib import Path

from launcher.errors import RecipeError

RELEASE_EVERY = 256 * 2**20  # bytes read through the maps before they are dropped and re-opened


@dataclass(frozen=True)
class Piece:
    rank: int
    group: int
    start: int
    length: int


@dataclass(frozen=True)
class Entry:
    name: str
    shape: tuple[int, ...]
    pieces: tuple[Piece, ...]  # trainable: from the optimizer files; empty: frozen, from the model-state files


class ZeroCheckpoint:
    """The tensors of one `global_stepN/` directory, by parameter name, in the model's order."""

    def __init__(self, step_dir: Path):
        self.dir = step_dir
        states = sorted(step_dir.glob("*model_states.pt"))
        if not states:
            raise RecipeError(f"{step_dir}: no *model_states.pt files; not a DeepSpeed checkpoint")
        first = load(states[0])
        self.world = first["dp_world_size"]
        self.stage = 3 if states[0].name.startswith("zero_pp_rank_") else 2
        self.optim_files = [self._rank_file(r, "optim_states.pt") for r in range(self.world)]
        self.model_files = [self._rank_file(r, "model_states.pt") for r in range(self.world)] if self.stage == 3 \
            else [states[0]]
        self._check_no_extra_ranks()
        self.param_shapes = first["param_shapes"]
        self.frozen_shapes = first.get("frozen_param_shapes") or {}
        self.shared = dict(first.get("shared_params") or {})
        self.buffers = {n: first["module"][n] for n in first.get("buffer_names", []) if n in first["module"]}
        self.global_steps = first.get("global_steps")
        self._optim = None
        self._frozen = None
        self._mapped_bytes = 0
        self.entries = self._entries()
        self.release()

    def _rank_file(self, rank: int, suffix: str) -> Path:
        matches = list(self.dir.glob(f"*zero_pp_rank_{rank}_mp_rank_00_{suffix}"))
        if self.stage == 2 and suffix == "model_states.pt":
            matches = [self.dir / "mp_rank_00_model_states.pt"]
        if not matches or not matches[0].is_file():
            raise RecipeError(f"{self.dir}: the checkpoint was saved by {self.world} ranks but rank {rank}'s "
                              f"{suffix} file is missing; it is incomplete")
        return matches[0]

    def _check_no_extra_ranks(self) -> None:
        found = len(list(self.dir.glob("*zero_pp_rank_*_optim_states.pt")))
        if found != self.world:
            raise RecipeError(f"{self.dir}: {found} optimizer shard files but the saved world size is {self.world}")

    def _entries(self) -> list[Entry]:
        sizes = [self._group_sizes(g) for g in range(len(self.param_shapes))]
        out = []
        for group, shapes in enumerate(self.param_shapes):
            offset = 0
            for name, shape in shapes.items():
                numel = math.prod(shape)
                if numel == 0:
                    raise RecipeError(f"{self.dir}: parameter {name} has zero size; refusing an empty checkpoint")
                out.append(Entry(name, tuple(shape), self._pieces(group, offset, numel, sizes[group])))
                offset += math.ceil(numel / self.world) if self.stage == 3 else numel
            held = sizes[group][0] if self.stage == 3 else sum(sizes[group])
            if offset > held:
                raise RecipeError(f"{self.dir}: parameter shapes need {offset} values in group {group} but the "
                                  f"optimizer files hold {held}; shapes and shards do not match")
        out += [Entry(name, tuple(shape), ()) for name, shape in self.frozen_shapes.items()]
        return out

    def _group_sizes(self, group: int) -> list[int]:
        return [self.optim(rank)[group].numel() for rank in range(self.world)]

    def _pieces(self, group: int, offset: int, numel: int, sizes: list[int]) -> tuple[Piece, ...]:
        if self.stage == 3:  # every rank holds the same-size slice of every parameter, zero-padded at the end
            part = math.ceil(numel / self.world)
            return tuple(Piece(r, group, offset, part) for r in range(self.world))
        pieces, begin = [], 0  # ZeRO-2: rank r holds [begin, begin + sizes[r]) of the group's flat vector
        for rank, size in enumerate(sizes):
            lo, hi = max(offset, begin), min(offset + numel, begin + size)
            if lo < hi:
                pieces.append(Piece(rank, group, lo - begin, hi - lo))
            begin += size
        return tuple(pieces)

    # --- reading, through memory maps that `release` drops so resident memory stays bounded -------------------

    def optim(self, rank: int):
        if self._optim is None:
            self._optim = [None] * self.world
        if self._optim[rank] is None:
            state = load(self.optim_files[rank])["optimizer_state_dict"]
            key = "fp32_flat_groups" if self.stage == 3 else "single_partition_of_fp32_groups"
            self._optim[rank] = state[key]
        return self._optim[rank]

    def frozen(self, rank: int) -> dict:
        if self._frozen is None:
            self._frozen = [load(f).get("frozen_param_fragments") or {} for f in self.model_files]
        return self._frozen[rank]

    def chunks(self, entry: Entry) -> list:
        """1-D views into the memory maps whose concatenation is the parameter (frozen ones in their saved dtype)."""
        if entry.pieces:
            parts = [self.optim(p.rank)[p.group].narrow(0, p.start, p.length) for p in entry.pieces]
        else:
            parts = [self.frozen(r)[entry.name].reshape(-1) for r in range(len(self.model_files))]
        out, left = [], math.prod(entry.shape)
        for part in parts:  # ZeRO-3 pads each parameter's last slice: keep only the real values
            if left > 0:
                out.append(part[: min(left, part.numel())])
                left -= out[-1].numel()
        if left:
            raise RecipeError(f"{self.dir}: parameter {entry.name} is missing {left} of its values")
        self._mapped_bytes += sum(c.numel() * c.element_size() for c in out)
        return out

    def tensor(self, entry: Entry):
        """One parameter as a tensor of its own (a copy)."""
        import torch

        return torch.cat(self.chunks(entry)).view(entry.shape)

    def maybe_release(self) -> None:
        """Drop the maps once enough has been read through them, bounding resident memory."""
        if self._mapped_bytes > RELEASE_EVERY:
            self.release()

    def release(self) -> None:
        """Drop the memory maps: pages read so far stop counting as this process' resident memory."""
        self._optim = None
        self._frozen = None
        self._mapped_bytes = 0


class _ZeroStage(enum.IntEnum):
    """Stands in for deepspeed's ZeroStageEnum, so reading a checkpoint needs no deepspeed import (seconds)."""

    disabled = 0
    optimizer_states = 1
    gradients = 2
    weights = 3


class _Opaque:
    """Stands in for DeepSpeed's bookkeeping objects (loss scaler, fragment addresses); consolidation ignores them."""

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


def find_step_dir(checkpoint: Path) -> Path:
    """`latest` names the global_stepN directory; it must exist."""
    latest = checkpoint / "latest"
    if not latest.is_file():
        raise RecipeError(f"{checkpoint}: no 'latest' file; not a DeepSpeed checkpoint directory")
    step_dir = checkpoint / latest.read_text().strip()
    if not step_dir.is_dir():
        raise RecipeError(f"{checkpoint}: 'latest' names {step_dir.name}, which does not exist")
    return step_dir
