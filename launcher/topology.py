"""Where the ranks run: nodes, ranks per node, rendezvous; and the `deepspeed` command that starts them."""

from __future__ import annotations

import glob
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from launcher.errors import RecipeError

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class Topology:
    slots: tuple[int, ...]  # ranks on each node
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = DEFAULT_PORT
    hostfile: str | None = None  # the user's: DeepSpeed starts the other nodes over ssh

    @property
    def nnodes(self) -> int:
        return len(self.slots)

    @property
    def world(self) -> int:
        return sum(self.slots)

    def __str__(self) -> str:
        per_node = f"{self.slots[0]} ranks" if len(set(self.slots)) == 1 else f"{list(self.slots)} ranks"
        return f"{self.nnodes} node(s) x {per_node} = world size {self.world}"


def from_flags(nproc_per_node=None, nnodes=1, node_rank=0, master_addr="127.0.0.1", master_port=DEFAULT_PORT,
               hostfile=None) -> Topology:
    """Validate the launch flags (python-fire hands them over loosely typed)."""
    nnodes = _positive("--nnodes", nnodes)
    port = _positive("--master_port", master_port)
    rank = _positive("--node_rank", node_rank, minimum=0)
    if hostfile is not None:
        return Topology(read_hostfile(str(hostfile)), rank, str(master_addr), port, str(Path(hostfile).absolute()))
    per_node = _positive("--nproc_per_node", nproc_per_node) if nproc_per_node is not None else local_devices() or 1
    if rank >= nnodes:
        raise RecipeError(f"command line: --node_rank {rank} must be below --nnodes {nnodes}")
    return Topology((per_node,) * nnodes, rank, str(master_addr), port)


def _positive(flag: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise RecipeError(f"command line: {flag} must be an integer >= {minimum}, got {value!r}")
    return value


def read_hostfile(path: str) -> tuple[int, ...]:
    """Slots per host from a DeepSpeed hostfile (`name slots=N` per line)."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        raise RecipeError(f"{path}: hostfile not found") from None
    slots = []
    for number, line in enumerate(lines, 1):
        if not (words := line.split("#")[0].split()):
            continue
        if len(words) != 2 or not words[1].startswith("slots=") or not words[1][6:].isdigit():
            raise RecipeError(f"{path}: line {number} should read 'hostname slots=N', got {line.strip()!r}")
        slots.append(int(words[1][6:]))
    if not slots:
        raise RecipeError(f"{path}: hostfile lists no hosts")
    return tuple(slots)


def local_devices() -> int:
    """Visible CUDA devices, counted without importing torch (plan must stay fast)."""
    if (visible := os.environ.get("CUDA_VISIBLE_DEVICES")) is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    return len(glob.glob("/dev/nvidia[0-9]*"))


def rank_env(topology: Topology) -> dict[str, str]:
    """Environment the launcher adds for the ranks, where the user has not set it. On CPU, each rank gets its share
    of the cores: oversubscribed threads made training 6.4x slower here. torch's C++ layer logs a stack dump at
    warning level from every surviving rank when one rank dies, burying the real error: only its errors are shown."""
    env = {} if "TORCH_CPP_LOG_LEVEL" in os.environ else {"TORCH_CPP_LOG_LEVEL": "ERROR"}
    if local_devices() or "OMP_NUM_THREADS" in os.environ:
        return env
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    per_rank = max(1, cores // topology.slots[topology.node_rank])  # the cores Slurm or taskset gave us
    return {"OMP_NUM_THREADS": str(per_rank), **env}


def deepspeed_command(topology: Topology, worker_args: list[str], hostfile: str | None) -> list[str]:
    beside = Path(sys.executable).parent / "deepspeed"  # this environment's script: its shebang is this interpreter
    cmd = [str(beside) if beside.exists() else "deepspeed"]
    if topology.hostfile:
        cmd += ["--hostfile", topology.hostfile, "--master_addr", topology.master_addr]
    elif topology.nnodes > 1:
        cmd += ["--hostfile", hostfile, "--no_ssh", "--node_rank", str(topology.node_rank),
                "--master_addr", topology.master_addr]
    else:
        cmd += ["--num_nodes", "1", "--num_gpus", str(topology.slots[0])]
    return [*cmd, "--master_port", str(topology.master_port), "--module", "launcher.train", *worker_args]


def shell_line(env: dict[str, str], cmd: list[str]) -> str:
    return " ".join([*(f"{k}={shlex.quote(v)}" for k, v in env.items()), *map(shlex.quote, cmd)])
