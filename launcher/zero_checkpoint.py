"""Read a DeepSpeed ZeRO-2/3 checkpoint one tensor at a time, without building the whole state dict, and without torch.

Every rank's fp32 master weights sit in its optimizer file as flat groups. ZeRO-3 gives each rank a ceil(n/world)
slice of every parameter; ZeRO-2 gives each rank one contiguous slice of each group's flat vector. Either way a
parameter is a list of (rank, group, start, length) pieces, each a run of values at a known byte offset of a rank
file (a FileSlice), which the writer copies to the output shard (launcher/safetensors_stream.py).

torch.save writes a zip archive whose members are stored, not compressed: a pickle (data.pkl) that names each
tensor's storage by a key, and each storage's raw bytes (data/KEY). The pickle is read by a restricted unpickler
that allows only the globals torch's own weights_only loader allows in such files, each replaced by an inert
stand-in, so no pickled code runs; a tensor comes out as a Stored record (file, byte offset, dtype, shape) and its
values are read only when copied. Not calling torch.load spares importing torch (about a second, as long as copying
a 374M-parameter model: bench/consolidate.py) when no cast is needed, and reading through memory maps.
"""

from __future__ import annotations

import codecs
import enum
import io
import math
import pickle
import re
import struct
import zipfile
from collections import Counter, OrderedDict, namedtuple
from pathlib import Path

from launcher.errors import RecipeError
from launcher.safetensors_stream import ITEMSIZE as READABLE
from launcher.safetensors_stream import FileSlice

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
        self._optim, self._frozen = [None] * self.world, None  # read on first use
        self.entries = self._entries(first["param_shapes"], first.get("frozen_param_shapes") or {})
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

    def chunks(self, entry: Entry) -> list[FileSlice]:
        """Where the parameter's values lie, in order: runs of values in the rank files (frozen parameters in their
        saved dtype, trained ones in fp32)."""
        if entry.pieces:
            parts = [(self.optim(p.rank)[p.group], p.start, p.length) for p in entry.pieces]
        else:
            self._frozen = self._frozen or [load(f).get("frozen_param_fragments") or {} for f in self.model_files]
            parts = [(frozen[entry.name], 0, frozen[entry.name].numel()) for frozen in self._frozen]
        out, left = [], math.prod(entry.shape)
        for stored, start, length in parts:  # ZeRO-3 pads each parameter's last slice: keep only the real values
            if left > 0 and length > 0:
                out.append(stored.values(start, min(left, length), entry.name))
                left -= out[-1].count
        if left:
            raise RecipeError(f"{self.dir}: parameter {entry.name} is missing {left} of its values")
        return out

    def tensor(self, entry: Entry):
        """The parameter as a torch tensor in memory (the LoRA merge's adapter: small)."""
        import torch

        return torch.cat([c.tensor() for c in self.chunks(entry)]).view(entry.shape)


# Stand-ins for DeepSpeed's classes, so reading a checkpoint needs no deepspeed import (seconds): its ZeroStageEnum,
# and bookkeeping objects (loss scaler, fragment addresses) that consolidation ignores.
_ZeroStage = enum.IntEnum("_ZeroStage", "disabled optimizer_states gradients weights", start=0)


class _Opaque:
    def __setstate__(self, state):
        self.__dict__.update(state if isinstance(state, dict) else {})


ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int16": 2, "int8": 1,
            "uint8": 1, "bool": 1}
STORAGE_DTYPES = {"DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
                  "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16",
                  "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool", "UntypedStorage": "uint8"}
_Storage = namedtuple("_Storage", "path offset dtype")


class Stored(namedtuple("Stored", "path offset dtype shape contiguous")):
    """A tensor left in its file: its values start at byte OFFSET of PATH; DTYPE as torch names it (float32...)."""

    def numel(self) -> int:
        return math.prod(self.shape)

    def values(self, start: int, count: int, name: str) -> FileSlice:
        """Values START to START+COUNT, in storage order (the tensor's own order: it is contiguous)."""
        if start + count > self.numel():
            raise RecipeError(f"{self.path}: {name} needs values {start} to {start + count} of a tensor of "
                              f"{self.numel()}; shapes and shards do not match")
        if not self.contiguous or self.dtype not in READABLE:
            kind = self.dtype if self.contiguous else f"non-contiguous {self.dtype}"
            raise RecipeError(f"{self.path}: {name} is saved as a {kind} tensor, which consolidation cannot read")
        return FileSlice(self.path, self.offset + start * ITEMSIZE[self.dtype], self.dtype, count)


def _tensor(storage: _Storage, offset: int, size: tuple, stride: tuple, *_, dtype: str | None = None) -> Stored:
    """torch._utils._rebuild_tensor(_v2): a tensor at element OFFSET of its storage (requires_grad, hooks ignored)."""
    dtype = dtype or storage.dtype
    expected, contiguous = 1, True
    for n, step in reversed(list(zip(size, stride, strict=True))):
        contiguous &= n == 1 or step == expected
        expected *= n
    return Stored(storage.path, storage.offset + offset * ITEMSIZE.get(dtype, 0), dtype, tuple(size), contiguous)


# What torch.load(weights_only=True) allows (torch/_weights_only_unpickler.py), less the rebuilders of quantized,
# sparse and nested tensors, each as an inert stand-in; DeepSpeed's classes; torch's dtypes and storage types become
# their names (find_class). Nothing here runs code or touches a file.
ALLOWED = {
    "collections.OrderedDict": OrderedDict, "collections.Counter": Counter, "builtins.set": set,
    "builtins.bytearray": bytearray, "builtins.complex": complex, "_codecs.encode": codecs.encode,
    "torch.Size": tuple, "torch.device": lambda *args: args, "torch.Tensor": None, "torch.nn.parameter.Parameter": None,
    "torch._utils._rebuild_tensor": _tensor, "torch._utils._rebuild_tensor_v2": _tensor,
    "torch._utils._rebuild_tensor_v3": lambda s, o, size, stride, grad, hooks, dtype, *_: _tensor(s, o, size, stride,
                                                                                                   dtype=dtype),
    "torch._utils._rebuild_parameter": lambda data, *_: data,
    "torch._utils._rebuild_parameter_with_state": lambda data, *_: data,
    "torch._tensor._rebuild_from_type_v2": lambda rebuild, _type, args, _state: rebuild(*args),
    "deepspeed.runtime.zero.config.ZeroStageEnum": _ZeroStage,
    "deepspeed.runtime.fp16.loss_scaler.LossScaler": _Opaque,
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler": _Opaque,
    "deepspeed.utils.tensor_fragment.fragment_address": _Opaque,
}
DTYPE_NAME = re.compile(r"(b?float|complex|q?u?int)\d+\w*|bool")  # float32, bfloat16, float8_e4m3fn, uint8...


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, path: str, records: dict):
        super().__init__(io.BytesIO(data))
        self.path, self.records = path, records

    def find_class(self, module: str, name: str):
        module = "builtins" if module == "__builtin__" else module  # torch.save's protocol 2 uses Python 2's name
        if f"{module}.{name}" in ALLOWED:
            return ALLOWED[f"{module}.{name}"]
        if module == "torch" and name.endswith("Storage"):
            return STORAGE_DTYPES.get(name, name)
        if module == "torch" and DTYPE_NAME.fullmatch(name):
            return name  # a dtype: torch.float32 is pickled as the global torch.float32
        raise pickle.UnpicklingError(f"it names {module}.{name}, which is not allowed")

    def persistent_load(self, pid):
        """('storage', dtype, key, location, numel): where the storage's bytes lie."""
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and pid[2] in self.records):
            raise pickle.UnpicklingError(f"unknown storage {str(pid)[:80]}")
        _, dtype, key, _, numel = pid
        offset, size = self.records[key]
        if numel * ITEMSIZE.get(dtype, 0) > size:
            raise pickle.UnpicklingError(f"storage {key} needs more than its {size} bytes")
        return _Storage(self.path, offset, dtype)


def load(path: Path) -> dict:
    """What torch.save wrote to PATH, its tensors as Stored records. Plain data only, as with torch.load(weights_only=
    True): a global outside ALLOWED is refused, so no pickled code runs."""
    try:
        with zipfile.ZipFile(path) as archive, open(path, "rb") as raw:
            pickled = next((n for n in archive.namelist() if n.endswith("/data.pkl")), None)
            if pickled is None:
                raise ValueError("no data.pkl: not a file torch.save wrote")
            prefix = pickled.removesuffix("data.pkl")
            if prefix + "byteorder" in archive.NameToInfo and archive.read(prefix + "byteorder") != b"little":
                raise ValueError("saved on a big-endian machine")
            records = {i.filename.removeprefix(prefix + "data/"): _stored_range(raw, i) for i in archive.infolist()
                       if i.filename.startswith(prefix + "data/")}
            return _Unpickler(archive.read(pickled), str(path), records).load()
    except Exception as err:  # a truncated or foreign file: say which
        reason = (str(err) or type(err).__name__).splitlines()[0]
        raise RecipeError(f"{path}: cannot be read as a DeepSpeed checkpoint file ({reason})") from None


def _stored_range(raw, info: zipfile.ZipInfo) -> tuple[int, int]:
    """(byte offset in the file, size) of a zip member's data: it follows the member's local header, whose extra
    field torch pads to align the data."""
    if info.compress_type != zipfile.ZIP_STORED:
        raise ValueError(f"{info.filename} is compressed")
    raw.seek(info.header_offset)
    header = raw.read(30)
    if len(header) < 30 or header[:4] != b"PK\x03\x04":
        raise ValueError(f"{info.filename}: no local header where the directory says")
    name_length, extra_length = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_length + extra_length, info.file_size
