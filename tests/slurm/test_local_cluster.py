"""Sanity checks of the local Slurm cluster itself: multi-node steps, failure reporting, signal-driven requeue."""

from __future__ import annotations

import re
import textwrap

import pytest

pytestmark = pytest.mark.slurm


def write_script(path, body: str):
    path.write_text("#!/bin/bash\n" + textwrap.dedent(body).lstrip())
    return path


def test_two_node_job_runs_one_task_per_node_and_resolves_node_names(slurm_cluster, tmp_path):
    script = write_script(tmp_path / "two_nodes.sbatch", """
        #SBATCH --job-name=two-nodes
        set -euo pipefail
        srun bash -c 'echo "task node=$SLURM_NODEID proc=$SLURM_PROCID host=$SLURMD_NODENAME"'
        first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
        echo "master $first $(getent hosts "$first" | awk '{print $1}')"
    """)
    job_id = slurm_cluster.submit(script, "--nodes", "2", "--ntasks-per-node", "1", "--output", tmp_path / "out.txt")
    record = slurm_cluster.wait(job_id, timeout=60)
    out = slurm_cluster.output(job_id)
    assert (record["JobState"], record["ExitCode"]) == ("COMPLETED", "0:0"), slurm_cluster.describe(job_id)
    assert record["NumNodes"] == "2" and record["NodeList"] == "n[1-2]", record

    tasks = sorted(re.findall(r"^task node=(\d+) proc=(\d+) host=(\S+)$", out, re.M))
    assert tasks == [("0", "0", "n1"), ("1", "1", "n2")], out
    master = re.search(r"^master (\S+) (\S*)$", out, re.M)
    assert master and master.group(1) == "n1", out
    assert master.group(2), f"{master.group(1)} did not resolve inside the job:\n{out}"


def test_failing_task_fails_the_job_with_its_exit_code(slurm_cluster, tmp_path):
    script = write_script(tmp_path / "fail.sbatch", """
        echo "about to fail"
        srun bash -c 'exit 3'
    """)
    job_id = slurm_cluster.submit(script, "--output", tmp_path / "out.txt")
    record = slurm_cluster.wait(job_id, timeout=60)
    assert record["JobState"] == "FAILED", slurm_cluster.describe(job_id)
    assert record["ExitCode"] == "3:0", record
    assert "about to fail" in slurm_cluster.output(job_id)


def test_usr1_trap_requeues_the_job_which_then_completes(slurm_cluster, tmp_path):
    # The pattern a training job uses for preemption / time limits: Slurm (here: the test) sends USR1 to the batch
    # shell, the trap requeues the job, the job starts again with SLURM_RESTART_COUNT=1 and appends to its log.
    script = write_script(tmp_path / "requeue.sbatch", """
        #SBATCH --requeue --open-mode=append --signal=B:USR1@5
        trap 'echo "USR1 received"; scontrol requeue $SLURM_JOB_ID' USR1
        echo "run restart=${SLURM_RESTART_COUNT:-0}"
        if [[ ${SLURM_RESTART_COUNT:-0} -ge 1 ]]; then echo "finished"; exit 0; fi
        echo "waiting for USR1"
        for _ in $(seq 120); do sleep 1 & wait $!; done   # `wait` returns on a signal, so the trap runs at once
        echo "never signalled"; exit 1
    """)
    job_id = slurm_cluster.submit(script, "--output", tmp_path / "out.txt")
    slurm_cluster.wait_output(job_id, "waiting for USR1", timeout=60)  # the trap is set
    slurm_cluster.cancel(job_id, "--batch", "--signal=USR1")

    record = slurm_cluster.wait(job_id, until=lambda rec: rec["Restarts"] != "0", what="requeued", timeout=30)
    record = slurm_cluster.wait(job_id, timeout=90)  # cred_expire (10 s) must pass before it may start again
    out = slurm_cluster.output(job_id)
    assert (record["JobState"], record["ExitCode"], record["Restarts"]) == ("COMPLETED", "0:0", "1"), \
        slurm_cluster.describe(job_id)
    assert re.findall(r"^(run restart=\d|USR1 received|finished)$", out, re.M) == [
        "run restart=0", "USR1 received", "run restart=1", "finished"], out
