"""DeepSpeed ops that compile on first use (CPU Adam for offloaded optimizer states, among others) are built with
`-march=native` into torch's extensions directory, under a lock file. Two cluster hazards follow:
- a home directory shared by nodes of different CPU types: an op built on one node type crashes the other with an
  illegal instruction. Each CPU type gets its own directory.
- a build killed half-way (a time limit, Ctrl-C) leaves its lock, and every later start waits on it forever. A lock
  older than any real build is removed, saying so.
Building the ops once at install (`DS_BUILD_CPU_ADAM=1 pip install deepspeed ...`, see README) avoids both.
"""

from __future__ import annotations

import hashlib
import os
import platform
import time
from pathlib import Path

STALE_AFTER = 900  # seconds; building CPU Adam takes about a minute


def cpu_signature() -> str:
    """What -march=native compiles for: the CPU model and its instruction-set flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    wanted = ("model name", "flags", "Features", "CPU part")  # x86 and Arm spellings
    return "\n".join(sorted({line for line in lines if line.split(":")[0].strip() in wanted}))


def extensions_dir(root: Path, signature: str) -> Path:
    return root / f"{platform.machine()}-{hashlib.sha1(signature.encode()).hexdigest()[:12]}"


def prepare(environ=os.environ) -> list[Path]:
    """Point TORCH_EXTENSIONS_DIR at this CPU type's directory (unless set), then clear stale locks in it."""
    if "TORCH_EXTENSIONS_DIR" not in environ:
        from torch.utils.cpp_extension import get_default_build_root

        environ["TORCH_EXTENSIONS_DIR"] = str(extensions_dir(Path(get_default_build_root()), cpu_signature()))
    return clear_stale_locks(Path(environ["TORCH_EXTENSIONS_DIR"]))


def clear_stale_locks(root: Path, now: float | None = None) -> list[Path]:
    """Remove each op's build lock (`<root>/<op>/lock`, or one level deeper) older than STALE_AFTER."""
    now = time.time() if now is None else now
    removed = []
    for lock in [*root.glob("*/lock"), *root.glob("*/*/lock")]:
        try:
            if now - lock.stat().st_mtime > STALE_AFTER:
                lock.unlink()
                removed.append(lock)
        except FileNotFoundError:  # another rank of this node removed it, or the build finished
            continue
    for lock in removed:
        print(f"removed {lock}: a lock left by a DeepSpeed op build that never finished, on which this start "
              "would have waited forever", flush=True)
    return removed
