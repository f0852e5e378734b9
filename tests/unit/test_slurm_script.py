"""The rendered job script, run by bash against stand-ins for srun and scontrol (the unit tier has no cluster; the
real-Slurm tier in tests/slurm runs the same script on a real two-node cluster). Each test is one of the template
bugs common in this field, shown not to happen."""

from __future__ import annotations

import pytest

from launcher import slurm
from launcher.schema import SlurmSection
from tests.helpers import cli, run_batch_script, stand_ins

SECRET = "wandb-secret-value-123"


@pytest.fixture
def job(tmp_path, monkeypatch):
    """Render the script for a 2-node job, then run it as Slurm's batch shell would; returns (rc, output, calls)."""
    bin_dir = stand_ins(tmp_path, monkeypatch)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    options = SlurmSection(nodes=2, gpus_per_node=4, partition="gpu", setup=["export FROM_SETUP=1"])
    script = slurm.render(run_dir, "demo", options, consolidate=True, gpus=True)
    (run_dir / "job.sbatch").write_text(script)

    def run(**env) -> tuple[int, str, list[str]]:
        return run_batch_script(run_dir / "job.sbatch", bin_dir,
                                {"SLURM_JOB_ID": "4242", "WANDB_API_KEY": SECRET, **env})

    run.script = script
    return run


def test_each_node_gets_its_own_rank_and_the_same_rendezvous(job):
    rc, output, calls = job()
    assert rc == 0, output
    launches = [c for c in calls if " launch " in c]
    assert len(launches) == 2
    port = 24242  # 20000 + job id mod 12000
    for node, line in enumerate(launches):
        assert f"node={node} " in line and f"--node_rank {node} " in line, line
        assert f"--master_addr gpu-a --master_port {port}" in line, line  # first node of the allocation
        assert "--nnodes 2 " in line and "--nproc_per_node 4 " in line


@pytest.mark.parametrize("job_id", ["11999", "12767", "19999", "987654321"])
def test_port_stays_below_the_ephemeral_range(job, job_id):
    """Linux hands out 32768-60999 for outgoing connections: a master port there can be taken already."""
    _, _, calls = job(SLURM_JOB_ID=job_id)
    ports = {int(c.split("--master_port ")[1].split()[0]) for c in calls if " launch " in c}
    assert len(ports) == 1 and all(1024 < port < 32768 for port in ports), ports


def test_port_differs_between_jobs(job):
    ports = set()
    for job_id in ("100", "101"):
        _, _, calls = job(SLURM_JOB_ID=job_id)
        ports |= {c.split("--master_port ")[1].split()[0] for c in calls if " launch " in c}
    assert len(ports) == 2


def test_training_failure_is_the_job_exit_code_and_nothing_runs_after(job):
    rc, output, calls = job(TRAIN_RC="3")
    assert rc == 3, output
    assert not [c for c in calls if " consolidate " in c or c.startswith("requeue")]


def test_finished_training_consolidates_once_and_does_not_requeue(job):
    rc, _, calls = job()
    consolidations = [c for c in calls if " consolidate " in c]
    assert rc == 0 and len(consolidations) == 1 and "node=0 " in consolidations[0]
    assert not [c for c in calls if c.startswith("requeue")]


def test_stopped_training_requeues_instead_of_consolidating(job):
    rc, _, calls = job(STOP="1")
    assert rc == 0
    assert "requeue 4242" in calls
    assert not [c for c in calls if " consolidate " in c]


def test_secrets_reach_every_rank_but_are_never_written_or_printed(job):
    rc, output, calls = job()
    assert rc == 0
    assert all(f"secret={SECRET}" in c for c in calls if " launch " in c)
    assert SECRET not in job.script and SECRET not in output


def test_script_options_from_recipe_and_flags(tmp_path, recipe_factory):
    recipe = recipe_factory(slurm={"partition": "a100", "sbatch": ["--mem=0"], "setup": ["module load cuda/12.4"]})
    result = cli("submit", recipe, "--nodes", 2, "--gpus_per_node", 1, "--partition", "h100", "--time", "2-00:00:00",
                 "--slurm.signal_grace=600", "--dry_run")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for option in ("--nodes=2", "--partition=h100", "--time=2-00:00:00", "--mem=0", "--signal=B:USR1@600",
                   "--open-mode=append", "--requeue"):
        assert f"#SBATCH {option}" in lines, option
    assert any(line.startswith("#SBATCH --output=") and line.endswith("/logs/%x-%j.log") for line in lines)
    assert "module load cuda/12.4" in lines
    assert "set -euo pipefail" in lines
    assert not (tmp_path / "run").exists(), "a dry run wrote files"


def test_submit_needs_ranks_per_node(recipe_factory):
    result = cli("submit", recipe_factory(), "--nodes", 2, "--dry_run")
    assert result.returncode == 2 and "slurm.gpus_per_node is not set" in result.stderr
