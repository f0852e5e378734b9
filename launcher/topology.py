"""Where the ranks run: nodes, ranks per node, rendezvous; and the `deepspeed` command that starts them."""

from __future__ import annotations

import glob
import os
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from launcher.errors import RecipeError

DEFAULT_PORT = 29500
VISIBLE = "LAUNCHER_VISIBLE_DEVICES"
ENV_FILE = "deepspeed_env"  # in the run directory, for --hostfile starts
FORWARD = ("HF_", "HUGGINGFACE_", "TRANSFORMERS_", "TOKENIZERS_", "WANDB_", "OMP_", "MKL_", "TORCH_", "PYTORCH_",
           "GLOO_", "NCCL_", "CUDA_", "LAUNCHER_")
SECRET = re.compile(r"KEY|TOKEN|SECRET|PASSWORD", re.IGNORECASE)


@dataclass(frozen=True)
class Topology:
    slots: tuple[int, ...]  # ranks on each node
    node_rank: int = 0
    master_addr: str | None = None  # with a hostfile, None lets DeepSpeed ask the first host for its address
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


def from_flags(nproc_per_node=None, nnodes=1, node_rank=0, master_addr=None, master_port=DEFAULT_PORT,
               hostfile=None) -> Topology:
    """Validate the launch flags (python-fire hands them over loosely typed)."""
    nnodes = _positive("--nnodes", nnodes)
    port = _positive("--master_port", master_port)
    rank = _positive("--node_rank", node_rank, minimum=0)
    addr = None if master_addr is None else str(master_addr)
    if hostfile is not None:
        return Topology(read_hostfile(str(hostfile)), rank, addr, port, str(Path(hostfile).absolute()))
    per_node = _positive("--nproc_per_node", nproc_per_node) if nproc_per_node is not None else local_devices() or 1
    if rank >= nnodes:
        raise RecipeError(f"command line: --node_rank {rank} must be below --nnodes {nnodes}")
    return Topology((per_node,) * nnodes, rank, addr, port)


def check_rendezvous(topology: Topology) -> None:
    """A launch on several nodes without ssh: each node's ranks must be told where node 0 is."""
    if topology.nnodes > 1 and not topology.hostfile and topology.master_addr is None:
        raise RecipeError(f"command line: --nnodes {topology.nnodes} needs --master_addr, the address of node 0 "
                          "that every node can reach (or use --hostfile, and DeepSpeed finds it)")


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


def rank_env(topology: Topology, run_dir: Path) -> dict[str, str]:
    """Environment the launcher adds for the ranks, where the user has not set it. On CPU, each rank gets its share
    of the cores: oversubscribed threads made training 6.4x slower here. torch's C++ layer logs a stack dump at
    warning level from every surviving rank when one rank dies, burying the real error: only its errors are shown.

    DeepSpeed gives each node's ranks devices 0..N-1, replacing the CUDA_VISIBLE_DEVICES it was started with (a
    user's choice, or Slurm's without device cgroups): the ranks get the original list back (visible_devices).
    Over ssh (--hostfile) the ranks get no environment from here but what DeepSpeed reads from DS_ENV_FILE."""
    env = {} if "TORCH_CPP_LOG_LEVEL" in os.environ else {"TORCH_CPP_LOG_LEVEL": "ERROR"}
    if topology.hostfile:
        env["DS_ENV_FILE"] = str(run_dir / ENV_FILE)
    elif os.environ.get("CUDA_VISIBLE_DEVICES"):
        env[VISIBLE] = os.environ["CUDA_VISIBLE_DEVICES"]
    if local_devices() or "OMP_NUM_THREADS" in os.environ:
        return env
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    per_rank = max(1, cores // topology.slots[topology.node_rank])  # the cores Slurm or taskset gave us
    return {"OMP_NUM_THREADS": str(per_rank), **env}


def visible_devices(environ: dict[str, str]) -> str | None:
    """A rank's CUDA_VISIBLE_DEVICES: DeepSpeed's 0..N-1 read as positions in the list the launch was given."""
    chosen, given = environ.get(VISIBLE), environ.get("CUDA_VISIBLE_DEVICES")
    if not chosen:
        return given
    ids = [d.strip() for d in chosen.split(",")]
    return ",".join(ids[int(i)] for i in given.split(",")) if given else chosen


def forwarded(environ: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """What the ssh start passes to the hosts' ranks, as DeepSpeed's env file; and the names it leaves out. Secrets
    stay out: DeepSpeed writes the file's values into the pdsh command line, which it also logs."""
    names = [k for k in environ if k.startswith(FORWARD) and k not in ("DS_ENV_FILE", "CUDA_VISIBLE_DEVICES")]
    secret = [k for k in names if SECRET.search(k)]
    unsafe = [k for k in names if k not in secret and re.search(r'["$`\\\n]', environ[k])]
    return {k: environ[k] for k in names if k not in secret + unsafe}, secret + unsafe


def deepspeed_command(topology: Topology, worker_args: list[str], hostfile: str | None) -> list[str]:
    beside = Path(sys.executable).parent / "deepspeed"  # this environment's script: its shebang is this interpreter
    cmd = [str(beside) if beside.exists() else "deepspeed"]
    given = ["--master_addr", topology.master_addr] if topology.master_addr else []
    if topology.hostfile:  # no --master_addr unless given: DeepSpeed asks the first host (ssh HOST hostname -I)
        cmd += ["--hostfile", topology.hostfile, *given]
    elif topology.nnodes > 1:
        cmd += ["--hostfile", hostfile, "--no_ssh", "--node_rank", str(topology.node_rank),
                "--master_addr", topology.master_addr or "127.0.0.1"]  # launch refuses None (check_rendezvous)
    else:
        cmd += ["--num_nodes", "1", "--num_gpus", str(topology.slots[0])]
    return [*cmd, "--master_port", str(topology.master_port), "--module", "launcher.train", *worker_args]


def shell_line(env: dict[str, str], cmd: list[str]) -> str:
    return " ".join([*(f"{k}={shlex.quote(v)}" for k, v in env.items()), *map(shlex.quote, cmd)])
