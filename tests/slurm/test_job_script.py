"""The rendered job script on the real two-node cluster, with a stand-in for the job's python (the launch step's
behaviour is a bash snippet each test writes): the signal, requeue, srun and sbatch-parsing behaviour is Slurm's
own. Each test is one of the cluster failures of issue 13 (items 5, 6 and 7), shown not to happen."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import psutil
import pytest

from launcher import slurm
from launcher.schema import SlurmSection
from tests.helpers import assert_rejected, cli, smoke_recipe, stand_in

pytestmark = [pytest.mark.slurm, pytest.mark.integration]

# The job's python: records each call (node, the CPUs its task was given, arguments); `launch` then runs the test's
# behaviour snippet, if any
PYTHON = """#!/bin/bash
echo "node=${SLURM_NODEID:-} cpus=${SLURM_CPUS_PER_TASK:-} args=$*" >> "$RUN_DIR/calls"
[[ $3 == launch && -f $RUN_DIR/behaviour ]] && source "$RUN_DIR/behaviour"
exit 0
"""
STOPPED = 'echo \'{"step": 1}\' > "$RUN_DIR/stopped.json"'  # what a launch stopped by the stop file leaves


@pytest.fixture
def job_script(slurm_cluster, tmp_path, monkeypatch):
    """job_script(behaviour, run_dir=..., name=..., **slurm options) -> (script, run_dir); jobs it submits
    (via submit()) are cancelled at the end."""
    monkeypatch.setattr(sys, "executable", str(stand_in(tmp_path, "python", PYTHON)))
    submitted = []

    def make(behaviour: str = "", run_dir: Path | None = None, name: str = "job", **options) -> tuple[Path, Path]:
        run_dir = run_dir or tmp_path / "run"
        (run_dir / "logs").mkdir(parents=True)
        (run_dir / "behaviour").write_text(behaviour)
        options = {"nodes": 1, "gpus_per_node": 1, "signal_grace": 0, **options}
        script = run_dir / "job.sbatch"
        script.write_text(slurm.render(run_dir, name, SlurmSection(**options), consolidate=True, gpus=False))
        return script, run_dir

    def submit(script: Path, *args: str) -> str:
        submitted.append(slurm_cluster.submit(script, *args))
        return submitted[-1]

    make.submit = submit
    yield make
    for job in submitted:
        slurm_cluster.run("scancel", job, check=False)


def calls(run_dir: Path) -> list[str]:
    return (run_dir / "calls").read_text().splitlines() if (run_dir / "calls").exists() else []


def batch_shell(job: str) -> psutil.Process:
    """The job's batch shell: slurmd runs it as <spool>/job<id>/slurm_script."""
    marker = f"job{int(job):05d}/slurm_script"
    return next(p for p in psutil.process_iter(["cmdline"]) if marker in " ".join(p.info["cmdline"] or []))


def until(condition, timeout: float = 60, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"not {what} after {timeout} s"
        time.sleep(0.05)
    return value


def usr1_pending(pid: int) -> bool:
    status = dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return bool((int(status["SigPnd"], 16) | int(status["ShdPnd"], 16)) & (1 << (signal.SIGUSR1 - 1)))


# --- item 6: signal races ------------------------------------------------------------------------------------------

def test_usr1_just_as_srun_exits_does_not_fail_the_job(slurm_cluster, job_script):
    """The race made certain: the batch shell is stopped while Slurm delivers USR1 and srun exits, so when it
    continues the trap interrupts a `wait` whose srun is already gone (bash then says 138, the trap's status)."""
    script, run_dir = job_script('touch "$RUN_DIR/started"; until [[ -f $RUN_DIR/release ]]; do sleep 0.05; done')
    job = job_script.submit(script)
    until(lambda: (run_dir / "started").exists(), what="launched")
    shell = batch_shell(job)
    srun = next(p for p in shell.children() if p.name() == "srun")
    shell.suspend()
    try:
        slurm_cluster.run("scancel", "--batch", "--signal=USR1", job)
        until(lambda: usr1_pending(shell.pid), what="USR1 delivered")
        (run_dir / "release").touch()
        until(lambda: srun.status() == psutil.STATUS_ZOMBIE, what="srun exited")
    finally:
        shell.resume()
    record = slurm_cluster.wait(job, timeout=60)
    text = slurm_cluster.output(job)
    assert (record["JobState"], record["ExitCode"]) == ("COMPLETED", "0:0"), slurm_cluster.describe(job)
    assert "stop signal received" in text and "training failed" not in text
    assert any(" consolidate " in c for c in calls(run_dir))  # training had finished: the job went on


def test_usr1_during_the_setup_lines_stops_and_requeues_instead_of_killing_the_job(slurm_cluster, job_script):
    setup = ['echo "test: setup running"', "[[ ${SLURM_RESTART_COUNT:-0} -gt 0 ]] || sleep 5"]
    script, run_dir = job_script(f'[[ -f $LAUNCHER_STOP_FILE ]] && {STOPPED}', setup=setup)
    job = job_script.submit(script)
    slurm_cluster.wait_output(job, "test: setup running")
    slurm_cluster.run("scancel", "--batch", "--signal=USR1", job)
    record = slurm_cluster.wait(job, timeout=90)
    text = slurm_cluster.output(job)
    assert (record["JobState"], record["ExitCode"], record["Restarts"]) == ("COMPLETED", "0:0", "1"), \
        slurm_cluster.describe(job)
    assert "stop signal received" in text and f"requeueing job {job}" in text


def test_first_node_finishes_its_work_after_the_other_node_exits(slurm_cluster, job_script):
    """Rank 0 finishes W&B and writes the stop record after the other nodes are done; srun --wait=120 killed it
    120 s after they exited. (This test takes that long to tell.)"""
    work = '[[ $SLURM_NODEID == 0 ]] && sleep 125 && touch "$RUN_DIR/first-node-done"'
    script, run_dir = job_script(work, nodes=2)
    job = job_script.submit(script)
    record = slurm_cluster.wait(job, timeout=200)
    assert (record["JobState"], record["ExitCode"]) == ("COMPLETED", "0:0"), slurm_cluster.describe(job)
    assert (run_dir / "first-node-done").exists()


def test_each_node_task_gets_the_nodes_cpus(slurm_cluster, job_script):
    """Whole nodes (2 CPUs each here): the task on each node is given both, which the launcher shares out between
    the node's ranks (Slurm binds a task to what it was given, where it binds tasks to cores)."""
    script, run_dir = job_script(nodes=2, exclusive=True)
    job = job_script.submit(script)
    record = slurm_cluster.wait(job, timeout=60)
    assert (record["JobState"], record["ExitCode"]) == ("COMPLETED", "0:0"), slurm_cluster.describe(job)
    launches = sorted(c.split(" args=")[0] for c in calls(run_dir) if " launch " in c)
    assert launches == ["node=0 cpus=2", "node=1 cpus=2"], calls(run_dir)


# --- item 5: requeue storms ----------------------------------------------------------------------------------------

def test_requeues_without_a_new_checkpoint_stop_after_three(slurm_cluster, job_script):
    script, run_dir = job_script(STOPPED)  # every start stops before saving anything
    job = job_script.submit(script)
    record = slurm_cluster.wait(job, timeout=120)
    text = slurm_cluster.output(job)
    assert (record["JobState"], record["ExitCode"], record["Restarts"]) == ("FAILED", "1:0", "2"), \
        slurm_cluster.describe(job)
    assert "launcher: error: stopped 3 times in a row without a new complete checkpoint; not requeueing" in text


def test_grace_that_does_not_fit_the_default_time_limit_is_refused_at_start(slurm_cluster, job_script):
    """slurm.time unset, so plan cannot check; the job's real limit (here --time on the command line, as a
    partition's DefaultTime would give it) leaves no room for the 300 s grace."""
    script, run_dir = job_script(signal_grace=300)
    job = job_script.submit(script, "--time=2")
    record = slurm_cluster.wait(job, timeout=60)
    assert (record["JobState"], record["ExitCode"]) == ("FAILED", "2:0"), slurm_cluster.describe(job)
    assert "slurm.signal_grace is 300 s, which does not fit inside this job's time limit 2:00 (120 s" in \
        slurm_cluster.output(job)
    assert not calls(run_dir)


# --- item 7: rendered values ---------------------------------------------------------------------------------------

def test_sbatch_reads_every_rendered_value_whole(slurm_cluster, job_script, tmp_path):
    """A space, '#' or '%' in the run directory and quotes in the name: the log goes where it should, the comment
    names the run directory, and the directives after them (--time, --requeue) still count."""
    run_dir = tmp_path / "my run #1 100%"
    script, _ = job_script(run_dir=run_dir, name='demo "x" y', time="7:00", partition="local")
    job = job_script.submit(script)
    record = slurm_cluster.wait(job, timeout=60)
    assert (record["JobState"], record["ExitCode"]) == ("COMPLETED", "0:0"), slurm_cluster.describe(job)
    assert record["JobName"] == 'demo "x" y' and record["Comment"] == f"launcher:{run_dir}"
    assert (record["TimeLimit"], record["Requeue"]) == ("00:07:00", "1"), record
    log = run_dir / "logs" / f'demo "x" y-{job}.log'
    assert f"launcher: job {job} " in log.read_text()


def test_a_live_job_keeps_its_run_directory_to_itself(slurm_cluster, tmp_path, monkeypatch):
    """By the normalised path, also for an array (its comment names the sweep directory); never against the job's
    own launches."""
    (tmp_path / "sleep.sbatch").write_text("#!/bin/bash\nsleep 300\n")
    run_dir, sweep = tmp_path / "run", tmp_path / "run-sweep"
    (tmp_path / "link").symlink_to(tmp_path)
    plain = slurm_cluster.submit(tmp_path / "sleep.sbatch", f"--comment=launcher:{tmp_path}/link/x/../run/",
                                 f"--output={tmp_path}/%j.out")
    array = slurm_cluster.submit(tmp_path / "sleep.sbatch", f"--comment=launcher:{sweep}", "--array=0-1",
                                 f"--output={tmp_path}/%A_%a.out")
    try:
        for env in ({}, {"SLURM_JOB_ID": "1"}):
            with monkeypatch.context() as m:
                for key in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID"):
                    m.delenv(key, raising=False)
                for key, value in env.items():
                    m.setenv(key, value)
                with pytest.raises(slurm.RecipeError, match=f"job {plain} is already training into {run_dir}"):
                    slurm.refuse_active_job(run_dir)
                with pytest.raises(slurm.RecipeError, match=f"job {array}_[01] is already training into {sweep}"):
                    slurm.refuse_active_job(sweep / "v00-lr=1")
        result = cli("launch", smoke_recipe(tmp_path), "--nproc_per_node", 1)  # its run directory: tmp_path/run
        assert_rejected(result, f"job {plain} is already training into {run_dir}")
        monkeypatch.setenv("SLURM_JOB_ID", plain)  # the job's own launch
        slurm.refuse_active_job(run_dir)
        monkeypatch.setenv("SLURM_JOB_ID", str(int(array) + 1))  # a task of the array: its own variant
        monkeypatch.setenv("SLURM_ARRAY_JOB_ID", array)
        slurm.refuse_active_job(sweep / "v00-lr=1")
    finally:
        slurm_cluster.run("scancel", plain, array, check=False)
