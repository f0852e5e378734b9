"""`submit`: the job script, rendered from the shipped template and the validated recipe, and the calls to Slurm."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from launcher import assets
from launcher.errors import RecipeError
from launcher.schema import SlurmSection

SCRIPT = "job.sbatch"

CONSOLIDATE = """
echo "launcher: training finished; consolidating into $RUN_DIR/final"
srun --nodes=1 --ntasks=1 "$LAUNCHER_PYTHON" -m launcher consolidate "$RUN_DIR" "$RUN_DIR/final" --overwrite
"""

ARRAY_RUN_DIR = """# job array: task i trains the i-th run directory of the sweep (counted from 0)
RUN_DIRS=(
{dirs}
)
export RUN_DIR="${{RUN_DIRS[$SLURM_ARRAY_TASK_ID]}}"
echo "launcher: array task ${{SLURM_ARRAY_JOB_ID}}_${{SLURM_ARRAY_TASK_ID}} trains $RUN_DIR"
"""


def log_pattern(run_dir: Path, array: bool = False) -> str:
    """Where the job's output goes; an array's tasks share one directory (the sweep's), one log per task."""
    return str(run_dir / "logs" / ("%x-%A_%a.log" if array else "%x-%j.log"))


def render(run_dir: Path, name: str, options: SlurmSection, consolidate: bool, gpus: bool,
           array: list[Path] | None = None, max_parallel: int | None = None) -> str:
    """The job script. With `array` (the sweep's run directories), one job array: task i trains array[i], at most
    `max_parallel` at a time; run_dir is then the sweep directory, for the logs and the job's comment."""
    parallel = f"%{max_parallel}" if max_parallel else ""
    options_lines = sbatch_options(options, gpus) + ([f"--array=0-{len(array) - 1}{parallel}"] if array else [])
    dirs = "\n".join("    '" + str(d).replace("'", "'\\''") + "'" for d in array or [])  # quoted, even a=b
    set_run_dir = ARRAY_RUN_DIR.format(dirs=dirs).rstrip() if array else f"export RUN_DIR={shlex.quote(str(run_dir))}"
    values = {"JOB_NAME": name, "NODES": str(options.nodes), "LOG": log_pattern(run_dir, bool(array)),
              "COMMENT": f"launcher:{run_dir}", "SBATCH_OPTIONS": "\n".join(f"#SBATCH {o}" for o in options_lines),
              "SETUP": "\n".join(options.setup) or "# (none)", "RUN_DIR": set_run_dir,
              "PYTHON": shlex.quote(sys.executable), "PROCS": str(options.gpus_per_node),
              "CONSOLIDATE": CONSOLIDATE if consolidate else ""}
    text = (assets.shipped() / "job.sbatch").read_text()  # slurm/job.sbatch in a checkout
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", value)
    if "{{" in text:
        raise RuntimeError(f"job template: placeholder left unfilled: {text[text.index('{{'):][:40]}")
    return text


def sbatch_options(options: SlurmSection, gpus: bool) -> list[str]:
    out = [f"--gpus-per-node={options.gpus_per_node}"] if gpus else []
    values = {key: getattr(options, key) for key in ("partition", "time", "account", "qos", "constraint")}
    out += [f"--{key}={value}" for key, value in values.items() if value is not None]
    out += ["--exclusive"] if options.exclusive else []
    out += [f"--signal=B:USR1@{options.signal_grace}"] if options.signal_grace else []
    return out + options.sbatch  # each checked by rules.check


def cluster_has_gpus() -> bool:
    """Whether the cluster offers GPUs (a gres named gpu); with none, ranks run on CPUs and no GPU is requested.
    Unknown (no sinfo here, as on a laptop with --dry_run): assume a GPU cluster."""
    if shutil.which("sinfo") is None:
        return True
    result = subprocess.run(["sinfo", "-h", "-o", "%G"], capture_output=True, text=True, timeout=30)
    return result.returncode != 0 or "gpu" in result.stdout


def refuse_active_job(run_dir: Path) -> None:
    """Two jobs training into one run directory would overwrite each other's checkpoints."""
    if shutil.which("squeue") is None:
        return
    result = subprocess.run(["squeue", "-h", "-o", "%i %k"], capture_output=True, text=True, timeout=30)
    for line in result.stdout.splitlines():
        job, _, comment = line.partition(" ")
        if comment.strip() == f"launcher:{run_dir}":
            raise RecipeError(f"{run_dir}: job {job} is already training into this run directory; wait for it or "
                              f"cancel it (scancel {job})")


def job_log(run_dir: Path, name: str, job: str, array: bool = False) -> str:
    """The log file of a submitted job (an array's: the pattern of its tasks' logs)."""
    return log_pattern(run_dir, array).replace("%x", name).replace("%j", job).replace("%A", job)


def job_state(job: str) -> str | None:
    """JobState of a job or array task (`123_4`) while the controller remembers it (MinJobAge), else None."""
    if shutil.which("scontrol") is None:
        return None
    result = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=30)
    return next((f.split("=", 1)[1] for f in result.stdout.split() if f.startswith("JobState=")), None)


def sbatch(script: Path) -> str:
    if shutil.which("sbatch") is None:
        raise RecipeError("sbatch not found: run submit on a Slurm login node, or add --dry_run to see the script")
    result = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise RecipeError(f"{script}: sbatch refused the job: {result.stderr.strip() or result.stdout.strip()}")
    return result.stdout.strip().split(";")[0]
