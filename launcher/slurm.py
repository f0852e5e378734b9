"""`submit`: the job script, rendered from the shipped template and the validated recipe, and the calls to Slurm."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from launcher import assets
from launcher.errors import RecipeError
from launcher.schema import SlurmSection, fail

SCRIPT = "job.sbatch"

# wandb.log_model uploads this final/, the one the step before it wrote (the training step ran without consolidation)
CONSOLIDATE = """
echo "launcher: training finished; consolidating into $RUN_DIR/final"
srun --nodes=1 --ntasks=1 --cpus-per-task="$CPUS" "$LAUNCHER_PYTHON" -m launcher consolidate "$RUN_DIR" \\
    "$RUN_DIR/final" --overwrite
srun --nodes=1 --ntasks=1 "$LAUNCHER_PYTHON" -m launcher.tracking "$RUN_DIR"
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
           array: list[Path] | None = None, max_parallel: int | None = None, where: str = "recipe") -> str:
    """The job script. With `array` (the sweep's run directories), one job array: task i trains array[i], at most
    `max_parallel` at a time; run_dir is then the sweep directory, for the logs and the job's comment."""
    for key, value in (("run.name", name), ("run.output_dir", str(run_dir))):
        if bad := re.search(r"[\x00-\x1f\x7f\\]" + ("|/" if key == "run.name" else ""), value):
            fail(where, key, f"is {value!r}: a Slurm job cannot take {bad.group()!r} in its name or log path "
                 "(sbatch reads one line per #SBATCH option; %x in --output puts the name in a file name)")
    parallel = f"%{max_parallel}" if max_parallel else ""
    array_option = [f"--array=0-{len(array) - 1}{parallel}"] if array else []
    options_lines = sbatch_options(options, gpus, where) + array_option
    dirs = "\n".join("    '" + str(d).replace("'", "'\\''") + "'" for d in array or [])  # quoted, even a=b
    set_run_dir = ARRAY_RUN_DIR.format(dirs=dirs).rstrip() if array else f"export RUN_DIR={shlex.quote(str(run_dir))}"
    log = log_pattern(Path(str(run_dir).replace("%", "%%")), bool(array))  # %% is a plain % to sbatch
    values = {"JOB_NAME": quote(name), "NODES": str(options.nodes), "LOG": quote(log),
              "COMMENT": quote(f"launcher:{run_dir}"),
              "SBATCH_OPTIONS": "\n".join(f"#SBATCH {o}" for o in options_lines),
              "SETUP": "\n".join(options.setup) or "# (none)", "RUN_DIR": set_run_dir,
              "PYTHON": shlex.quote(sys.executable), "PROCS": str(options.gpus_per_node),
              "GRACE": str(options.signal_grace), "CONSOLIDATE": CONSOLIDATE if consolidate else ""}
    text = (assets.shipped() / "job.sbatch").read_text()  # slurm/job.sbatch in a checkout
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", value)
    if "{{" in text:
        raise RuntimeError(f"job template: placeholder left unfilled: {text[text.index('{{'):][:40]}")
    return text


def quote(value: str) -> str:
    """One #SBATCH value, quoted where it needs it. sbatch (not bash) reads these lines a word at a time, and an
    unquoted '#' ends the line; inside double quotes spaces and '#' are plain, and a backslash makes the next
    character plain (checked against sbatch 22.05)."""
    if re.fullmatch(r"[\w.,:@%+=/-]+", value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def sbatch_options(options: SlurmSection, gpus: bool, where: str = "recipe") -> list[str]:
    out = [f"--gpus-per-node={options.gpus_per_node}"] if gpus else []
    values = {key: getattr(options, key) for key in ("partition", "time", "account", "qos", "constraint")}
    for key, value in values.items():
        if value is not None and re.search(r"[\x00-\x1f\x7f]", value):
            fail(where, f"slurm.{key}", f"is {value!r}: a control character cannot go into an #SBATCH line")
    out += [f"--{key}={quote(value)}" for key, value in values.items() if value is not None]
    out += ["--exclusive"] if options.exclusive else []
    out += [f"--signal=B:USR1@{options.signal_grace}"] if options.signal_grace else []
    for option in options.sbatch:  # as on the command line (rules.check: one option each): --mem 0, --mem=0
        try:
            words = shlex.split(option)
        except ValueError as err:
            fail(where, "slurm.sbatch", f"{option!r} does not parse as a command-line option: {err}")
        key, sep, value = words[0].partition("=")
        out.append(" ".join([quote(key) + sep + quote(value) if sep else quote(key), *map(quote, words[1:])]))
    return out


def cluster_has_gpus() -> bool:
    """Whether the cluster offers GPUs (a gres named gpu); with none, ranks run on CPUs and no GPU is requested.
    Unknown (no sinfo here, as on a laptop with --dry_run): assume a GPU cluster."""
    if shutil.which("sinfo") is None:
        return True
    result = subprocess.run(["sinfo", "-h", "-o", "%G"], capture_output=True, text=True, timeout=30)
    return result.returncode != 0 or "gpu" in result.stdout


def refuse_active_job(run_dir: Path) -> None:
    """Two jobs training into one run directory (or one inside the other: an array's comment names the sweep
    directory) would overwrite each other's checkpoints. The job itself, and the other tasks of its own array
    (each trains its own variant), are not in the way of its own launches."""
    if shutil.which("squeue") is None:
        return
    try:  # a line per array task (-r): %A its own job id, %F its array's (a plain job's: its id), %i as users see it
        result = subprocess.run(["squeue", "-h", "-r", "-o", "%A %F %i %k"], capture_output=True, text=True,
                                timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return  # no answer from Slurm: nothing known to be in the way
    here = Path(os.path.realpath(run_dir))
    own = {os.environ.get("SLURM_JOB_ID"), os.environ.get("SLURM_ARRAY_JOB_ID")} - {None}
    for line in result.stdout.splitlines():
        job_id, array, job, comment = (line.split(" ", 3) + ["", "", ""])[:4]
        if not comment.startswith("launcher:") or job_id in own or array in own:
            continue
        there = Path(os.path.realpath(comment.removeprefix("launcher:")))
        if there == here or there in here.parents or here in there.parents:
            raise RecipeError(f"{run_dir}: job {job} is already training into {there}; wait for it or cancel it "
                              f"(scancel {job})")


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
