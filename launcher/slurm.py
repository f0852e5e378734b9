"""`submit`: the job script rendered from slurm/job.sbatch and the validated recipe, and the calls to Slurm."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from launcher.errors import RecipeError
from launcher.schema import SlurmSection

TEMPLATE = Path(__file__).resolve().parents[1] / "slurm" / "job.sbatch"
SCRIPT = "job.sbatch"

CONSOLIDATE = """
echo "launcher: training finished; consolidating into $RUN_DIR/final"
srun --nodes=1 --ntasks=1 "$LAUNCHER_PYTHON" -m launcher consolidate "$RUN_DIR" "$RUN_DIR/final" --overwrite
"""


def log_pattern(run_dir: Path) -> str:
    return str(run_dir / "logs" / "%x-%j.log")


def render(run_dir: Path, name: str, options: SlurmSection, consolidate: bool, gpus: bool) -> str:
    values = {
        "JOB_NAME": name,
        "NODES": str(options.nodes),
        "LOG": log_pattern(run_dir),
        "COMMENT": f"launcher:{run_dir}",
        "SBATCH_OPTIONS": "\n".join(f"#SBATCH {o}" for o in sbatch_options(options, gpus)),
        "SETUP": "\n".join(options.setup) or "# (none)",
        "RUN_DIR": shlex.quote(str(run_dir)),
        "PYTHON": shlex.quote(sys.executable),
        "PROCS": str(options.gpus_per_node),
        "CONSOLIDATE": CONSOLIDATE if consolidate else "",
    }
    text = TEMPLATE.read_text()
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", value)
    if "{{" in text:
        raise RuntimeError(f"{TEMPLATE}: placeholder left unfilled: {text[text.index('{{'):][:40]}")
    return text


def sbatch_options(options: SlurmSection, gpus: bool) -> list[str]:
    out = [f"--gpus-per-node={options.gpus_per_node}"] if gpus else []
    for key in ("partition", "time", "account", "qos", "constraint"):
        value = getattr(options, key)
        if value is not None:
            out.append(f"--{key}={value}")
    if options.exclusive:
        out.append("--exclusive")
    if options.signal_grace:
        out.append(f"--signal=B:USR1@{options.signal_grace}")
    out += options.sbatch
    for option in out:
        if "\n" in option or not option.startswith("-"):
            raise RecipeError(f"slurm.sbatch: {option!r} is not one sbatch option like --mem=0")
    return out


def cluster_has_gpus() -> bool:
    """Whether the cluster offers GPUs (a gres named gpu); with none, ranks run on CPUs and no GPU is requested.
    Unknown (no sinfo here, as on a laptop with --dry_run): assume a GPU cluster."""
    if shutil.which("sinfo") is None:
        return True
    result = subprocess.run(["sinfo", "-h", "-o", "%G"], capture_output=True, text=True, timeout=30)
    return result.returncode != 0 or "gpu" in result.stdout


def active_job_for(run_dir: Path) -> str | None:
    """A queued or running job already training into this run directory (two would overwrite each other)."""
    result = subprocess.run(["squeue", "-h", "-o", "%i %k"], capture_output=True, text=True, timeout=30)
    for line in result.stdout.splitlines():
        job, _, comment = line.partition(" ")
        if comment.strip() == f"launcher:{run_dir}":
            return job
    return None


def sbatch(script: Path) -> str:
    if shutil.which("sbatch") is None:
        raise RecipeError("sbatch not found: run submit on a Slurm login node, or add --dry_run to see the script")
    result = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise RecipeError(f"{script}: sbatch refused the job: {result.stderr.strip() or result.stdout.strip()}")
    return result.stdout.strip().split(";")[0]
