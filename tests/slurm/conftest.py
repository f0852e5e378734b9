"""A real two-node Slurm cluster for the session: `slurm/local_cluster.sh start` before, `stop` after.

    def test_x(slurm_cluster, tmp_path):
        job_id = slurm_cluster.submit(script, "--nodes", "2")   # sbatch ARGS SCRIPT, run in the script's folder
        record = slurm_cluster.wait(job_id)                     # polls `scontrol show job -o` until a final state
        assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0"
        text = slurm_cluster.output(job_id)                     # the job's StdOut file

The cluster is the one `slurm/local_cluster.sh` describes (nodes n1 and n2 on 127.0.0.1, partition `local`, config
in /etc/slurm/slurm.conf, which the fixture also exports as SLURM_CONF for the session).  It must be started by
root; if it cannot be started the fixture fails with the script's output and the daemons' log tails -- these tests
never skip.  A cluster that was already running when the session began (a user's, for dry runs) is reused and left
running; one the fixture started is stopped at the end.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "slurm" / "local_cluster.sh"
STATE_DIR = Path(os.environ.get("SLURM_LOCAL_STATE_DIR", "/tmp/launcher-slurm"))
SLURM_CONF = Path("/etc/slurm/slurm.conf")
START_TIMEOUT = 900  # a fresh machine installs Slurm with apt-get first

# States a job does not leave (REQUEUED and the like are transitions, not ends).
TERMINAL = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
                      "BOOT_FAIL", "DEADLINE"})

# `scontrol show job -o` is one line of Key=Value fields separated by spaces; keys look like `NumCPUs`,
# `AllocNode:Sid`, `CPUs/Task`; values may contain '=' (TRES=cpu=2,node=2) but start no new `Key=`.
_FIELD_SPLIT = re.compile(r" +(?=[A-Za-z][\w:/]*=)")


def parse_scontrol_record(line: str) -> dict[str, str]:
    """One `scontrol show ... -o` line as a dict (first '=' splits key and value)."""
    fields = {}
    for part in _FIELD_SPLIT.split(line.strip()):
        key, sep, value = part.partition("=")
        if sep:
            fields[key] = value
    return fields


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"({exc})"


class SlurmCluster:
    """Helpers around the Slurm client commands, for the running local cluster."""

    def __init__(self, state_dir: Path = STATE_DIR, conf: Path = SLURM_CONF):
        self.state_dir = state_dir
        self.conf = conf
        self.script = SCRIPT
        self.nodes = ("n1", "n2")
        self.partition = "local"

    # -- commands --------------------------------------------------------------------------------------------------
    def run(self, *cmd: str, check: bool = True, timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
        """Run a Slurm command (`sinfo`, `scontrol ...`) against this cluster and capture its output."""
        env = {**os.environ, "SLURM_CONF": str(self.conf), **kwargs.pop("env", {})}
        proc = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, timeout=timeout, env=env, **kwargs)
        if check and proc.returncode != 0:
            pytest.fail(f"{' '.join(map(str, cmd))} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
        return proc

    def submit(self, script: Path | str, *sbatch_args: str, env: dict | None = None, cwd: Path | None = None) -> str:
        """`sbatch [ARGS] SCRIPT` from the script's folder (so slurm-%j.out lands there); returns the job id."""
        script = Path(script)
        proc = self.run("sbatch", "--parsable", *sbatch_args, script, cwd=cwd or script.parent, env=env or {})
        return proc.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """The job's record from `scontrol show job -o` (JobState, ExitCode, Restarts, NodeList, StdOut, ...)."""
        proc = self.run("scontrol", "show", "job", "-o", str(job_id))
        return parse_scontrol_record(proc.stdout.splitlines()[0])

    def output(self, job_id: str) -> str:
        """The text of the job's StdOut file so far ('' if not created yet)."""
        path = Path(self.job(job_id)["StdOut"])
        return path.read_text(errors="replace") if path.exists() else ""

    def cancel(self, job_id: str, *scancel_args: str) -> None:
        self.run("scancel", *scancel_args, str(job_id))

    def wait(self, job_id: str, states=TERMINAL, timeout: float = 60, until=None, what: str | None = None,
             poll: float = 0.25) -> dict[str, str]:
        """Poll the job until its JobState is in `states` (default: any final state) or, given `until`, until
        `until(record)` is true; returns the record.  Fails the test, with the job's record, output and the
        controller's log, after `timeout` seconds."""
        states = {states} if isinstance(states, str) else set(states)
        done = until or (lambda rec: rec.get("JobState") in states)
        deadline = time.monotonic() + timeout
        while True:
            record = self.job(job_id)
            if done(record):
                return record
            if time.monotonic() > deadline:
                pytest.fail(f"job {job_id}: not {what or '/'.join(sorted(states))} after {timeout:g}s\n"
                            + self.describe(job_id))
            time.sleep(poll)

    def wait_output(self, job_id: str, text: str, timeout: float = 60) -> str:
        """Poll the job's StdOut until it contains `text`; returns the whole output."""
        deadline = time.monotonic() + timeout
        while text not in (out := self.output(job_id)):
            if time.monotonic() > deadline:
                pytest.fail(f"job {job_id}: {text!r} not in its output after {timeout:g}s\n" + self.describe(job_id))
            time.sleep(0.25)
        return out

    def describe(self, job_id: str | None = None) -> str:
        """Job record, job output and daemon log tails, for failure messages."""
        parts = []
        if job_id is not None:
            proc = self.run("scontrol", "show", "job", str(job_id), check=False)
            parts += [f"---- scontrol show job {job_id} ----", proc.stdout + proc.stderr]
            try:
                parts += ["---- job output ----", self.output(job_id)]
            except Exception as exc:  # diagnostics must not raise
                parts.append(f"(no output: {exc})")
        return "\n".join(parts + [self.logs()])

    def logs(self, lines: int = 30) -> str:
        log_dir = self.state_dir / "log"
        files = [log_dir / "slurmctld.log", *sorted(log_dir.glob("slurmd-*.log"))]
        return "\n".join(f"---- tail {f} ----\n{_tail(f, lines)}" for f in files if f.exists())


def _script(*args: str, timeout: float) -> tuple[int, str]:
    try:
        proc = subprocess.run(["bash", str(SCRIPT), *args, str(STATE_DIR)], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode(errors="replace") + (exc.stderr or b"").decode(errors="replace")
        return -1, f"timed out after {timeout}s\n{out}"
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture(scope="session")
def slurm_cluster():
    cluster = SlurmCluster()
    t0 = time.monotonic()
    rc, out = _script("start", timeout=START_TIMEOUT)
    if rc != 0:
        _script("stop", timeout=120)
        logs = "" if "---- tail" in out else cluster.logs()  # the script prints the log tails itself if it can
        pytest.fail(f"could not start the local Slurm cluster (`{SCRIPT} start` exited {rc}):\n{out}\n{logs}",
                    pytrace=False)
    started_here = "reusing" not in out
    print(f"\n{out.strip()} [{time.monotonic() - t0:.1f}s]")
    saved_conf = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)  # for launcher code under test that calls sbatch/srun itself
    try:
        yield cluster
    finally:
        if saved_conf is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = saved_conf
        if started_here:
            rc, out = _script("stop", timeout=120)
            if rc != 0:
                pytest.fail(f"`{SCRIPT} stop` exited {rc}:\n{out}", pytrace=False)


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects: `-m "not integration"` must see these markers
def pytest_collection_modifyitems(config, items):
    """Every test under tests/slurm is in the slurm tier and, as a multi-process run, in the integration tier too, so
    that `-m "not integration"` never starts the cluster.  (The hook sees the whole session's items: only the ones
    in this folder are marked.)"""
    for item in items:
        if HERE in item.path.resolve().parents:
            for name in ("slurm", "integration"):
                if item.get_closest_marker(name) is None:
                    item.add_marker(name)
