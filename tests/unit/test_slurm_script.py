"""The rendered job script, run by bash against stand-ins for srun and scontrol (the unit tier has no cluster; the
real-Slurm tier in tests/slurm runs the same script on a real two-node cluster). Each test is one of the template
bugs common in this field, shown not to happen."""

from __future__ import annotations

import pytest

from launcher import slurm
from launcher.schema import SlurmSection
from tests.helpers import PYTHON, assert_rejected, cli, run_batch_script, stand_in, stand_ins

SECRET = "wandb-secret-value-123"


# squeue stand-in: the job's time limit (%l), as TIME_LIMIT says; the python stand-in also writes a new complete
# checkpoint when NEW_CHECKPOINT is set, as a stop after a trained step does
SQUEUE = """#!/bin/bash
echo "${TIME_LIMIT:-UNLIMITED}"
"""
PYTHON_SAVING = PYTHON.replace("#!/bin/bash\n", """#!/bin/bash
if [[ -n ${NEW_CHECKPOINT:-} && $3 == launch ]]; then
    mkdir -p "$RUN_DIR/checkpoints/checkpoint-$NEW_CHECKPOINT" && echo {} > "$_/complete.json"
fi
""")


@pytest.fixture
def render_job(tmp_path, monkeypatch):
    """render_job(**slurm_options): render the script for a 2-node job, then run it as Slurm's batch shell would
    with run(**env) -> (rc, output, calls)."""
    bin_dir = stand_ins(tmp_path, monkeypatch)
    stand_in(bin_dir, "squeue", SQUEUE)
    stand_in(bin_dir, "python", PYTHON_SAVING)
    run_dir = tmp_path / "run"
    run_dir.mkdir()

    def render(consolidate: bool = True, **options):
        options = {"nodes": 2, "gpus_per_node": 4, "partition": "gpu", "setup": ["export FROM_SETUP=1"], **options}
        script = slurm.render(run_dir, "demo", SlurmSection(**options), consolidate=consolidate, gpus=True)
        (run_dir / "job.sbatch").write_text(script)

        def run(**env) -> tuple[int, str, list[str]]:
            return run_batch_script(run_dir / "job.sbatch", bin_dir,
                                    {"SLURM_JOB_ID": "4242", "WANDB_API_KEY": SECRET, **env})

        run.script, run.run_dir = script, run_dir
        return run

    return render


@pytest.fixture
def job(render_job):
    return render_job()


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


def test_setup_lines_run_without_set_u(render_job):
    """Activation scripts (conda's, module's) read variables that may be unset; `set -u` would end the job."""
    job = render_job(setup=['[[ -z $NEVER_SET_ANYWHERE ]] && echo "setup ran"'])
    rc, output, calls = job()
    assert rc == 0 and "setup ran" in output, output
    assert [c for c in calls if " launch " in c]


def test_grace_longer_than_the_partition_default_limit_refuses_at_start(render_job):
    """slurm.time unset: plan cannot know the limit, the job can (squeue %l), and refuses before training."""
    job = render_job(signal_grace=300)
    rc, output, calls = job(TIME_LIMIT="2:00")
    assert rc == 2, output
    assert "launcher: error: slurm.signal_grace is 300 s, which does not fit inside this job's time limit 2:00 " \
           "(120 s" in output, output
    assert not [c for c in calls if " launch " in c]
    rc, output, _ = job(TIME_LIMIT="5:01")  # 301 s: fits
    assert rc == 0, output


def test_stops_without_a_new_checkpoint_end_after_three_in_a_row(render_job):
    job = render_job()
    for _ in range(2):
        rc, output, calls = job(STOP="1")
        assert rc == 0 and "requeue 4242" in calls, output
    rc, output, calls = job(STOP="1")
    assert rc == 1 and "requeue 4242" not in calls, output
    assert "launcher: error: stopped 3 times in a row without a new complete checkpoint; not requeueing" in output
    # a new job (a resubmit) starts counting again, and so does a stop that saved a new checkpoint
    assert job(STOP="1", SLURM_JOB_ID="4243")[0] == 0
    for step in (5, 10, 15, 20):
        rc, output, calls = job(STOP="1", NEW_CHECKPOINT=str(step))
        assert rc == 0 and "requeue 4242" in calls, output


def test_the_model_upload_follows_the_consolidation_step(render_job):
    """wandb.log_model: the training step does not consolidate; the job uploads the final/ its next step wrote."""
    job = render_job()
    _, _, calls = job()
    consolidate = next(i for i, c in enumerate(calls) if " consolidate " in c)
    assert calls[consolidate + 1:] == [f"node=0 secret={SECRET} args=-m launcher.tracking {job.run_dir}"], calls
    _, _, calls = job(STOP="1")  # stopped: no consolidation, nothing to upload
    assert not [c for c in calls if "launcher.tracking" in c]


def test_each_node_task_gets_the_nodes_cpus(render_job):
    job = render_job()
    srun = next(line for line in job.script.splitlines() if line.startswith("srun --kill-on-bad-exit"))
    assert '--cpus-per-task="$CPUS"' in srun and "--wait=0" in srun
    rc, output, _ = job(SLURM_JOB_CPUS_PER_NODE="72(x2),36")
    assert rc == 0 and "warning" not in output, output
    rc, output, _ = job(SLURM_JOB_CPUS_PER_NODE="2(x2)")  # fewer CPUs than the node's 4 ranks: said
    assert "launcher: warning: 2 CPU(s) per node for 4 ranks per node" in output, output


@pytest.mark.parametrize("key, value, option", [
    ("name", "demo\n#SBATCH --x", "run.name"), ("name", "a/b", "run.name"),
    ("run_dir", "runs/a\\b", "run.output_dir"), ("run_dir", "runs/a\nb", "run.output_dir"),
    ("partition", "gpu\n", "slurm.partition"), ("sbatch", "--constraint='a", "slurm.sbatch")])
def test_values_sbatch_cannot_take_are_refused_naming_the_key(tmp_path, key, value, option):
    name, run_dir, options = "demo", tmp_path / "run", {}
    if key == "name":
        name = value
    elif key == "run_dir":
        run_dir = tmp_path / value
    else:
        options = {key: [value] if key == "sbatch" else value}
    with pytest.raises(slurm.RecipeError, match=f"^recipe: {option} "):
        slurm.render(run_dir, name, SlurmSection(**options), consolidate=True, gpus=False)


def test_rendered_values_are_quoted_for_sbatch(tmp_path):
    run_dir = tmp_path / "my run #1 100%"
    options = SlurmSection(partition="gpu", constraint="a100&ib", sbatch=['--mem 0', '--comment2="x y"'])
    lines = slurm.render(run_dir, 'demo "x"', options, consolidate=True, gpus=False).splitlines()
    assert '#SBATCH --job-name="demo \\"x\\""' in lines
    assert f'#SBATCH --output="{tmp_path}/my run #1 100%%/logs/%x-%j.log"' in lines
    assert f'#SBATCH --comment="launcher:{run_dir}"' in lines
    assert "#SBATCH --partition=gpu" in lines and "#SBATCH --mem 0" in lines
    assert '#SBATCH --constraint="a100&ib"' in lines and '#SBATCH --comment2="x y"' in lines


def test_submit_refuses_a_line_break_in_the_job_name_in_one_line(recipe_factory):
    """sbatch reads #SBATCH lines up to the first line that is not one: the later directives would be lost."""
    recipe = recipe_factory(run={"name": "demo\n#SBATCH -x"})
    result = cli("submit", recipe, "--nodes", 1, "--gpus_per_node", 1, "--dry_run")
    assert_rejected(result, "run.name is 'demo\\n#SBATCH -x'")
