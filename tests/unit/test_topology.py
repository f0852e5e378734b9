"""Where the ranks meet and what they are given: the hostfile start, the devices a user chose, and the environment
passed to hosts over ssh (without secrets)."""

from __future__ import annotations

import json

from launcher import topology
from tests.helpers import assert_rejected, cli


def plan_json(*args, env=None) -> dict:
    result = cli("plan", *args, "--format", "json", env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_hostfile_start_lets_deepspeed_find_the_first_host(recipe_factory, tmp_path):
    """With --master_addr 127.0.0.1 forced, ranks on other hosts would wait on their own loopback."""
    hostfile = tmp_path / "hosts"
    hostfile.write_text("gpu-a slots=1\ngpu-b slots=1\n")
    cmd = plan_json(recipe_factory(), "--hostfile", hostfile)["command"]
    assert "--master_addr" not in cmd and cmd[cmd.index("--hostfile") + 1] == str(hostfile)
    cmd = plan_json(recipe_factory(), "--hostfile", hostfile, "--master_addr", "10.0.0.7")["command"]
    assert cmd[cmd.index("--master_addr") + 1] == "10.0.0.7"


def test_hostfile_start_passes_the_environment_but_no_secret(recipe_factory, tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("gpu-a slots=1\ngpu-b slots=1\n")
    env = {"OMP_NUM_THREADS": "3", "HF_HOME": "/shared/hf", "WANDB_PROJECT": "p", "WANDB_API_KEY": "s3cret",
           "HF_TOKEN": "hf_s3cret", "HF_ODD": "a$b"}
    plan = plan_json(recipe_factory(), "--hostfile", hostfile, env=env)
    env_file = plan["env"]["DS_ENV_FILE"]
    assert env_file.endswith(topology.ENV_FILE) and env_file.startswith(plan["run_dir"])
    text = cli("plan", recipe_factory(), "--hostfile", hostfile, env=env).stdout
    listed = text.split(f"--- {env_file}\n")[1].split("\n---")[0]
    assert "OMP_NUM_THREADS=3" in listed and "HF_HOME=/shared/hf" in listed and "WANDB_PROJECT=p" in listed
    assert "s3cret" not in text and "HF_ODD" not in listed  # a value a shell would expand is left out too


def test_several_nodes_without_ssh_need_the_master_address(recipe_factory):
    result = cli("launch", recipe_factory(), "--nnodes", 2, "--node_rank", 1, "--nproc_per_node", 1)
    assert_rejected(result, "--nnodes 2 needs --master_addr")


def test_ranks_get_the_devices_the_user_chose():
    """DeepSpeed hands each node's ranks 0..N-1; they are positions in the list the launch was started with."""
    given = {topology.VISIBLE: "4,5,6,7", "CUDA_VISIBLE_DEVICES": "0,1"}
    assert topology.visible_devices(given) == "4,5"
    assert topology.visible_devices({topology.VISIBLE: "GPU-aa,GPU-bb", "CUDA_VISIBLE_DEVICES": "1"}) == "GPU-bb"
    assert topology.visible_devices({"CUDA_VISIBLE_DEVICES": "0,1"}) == "0,1"  # nobody chose: as DeepSpeed set it


def test_launch_records_the_chosen_devices_for_the_ranks(recipe_factory):
    plan = plan_json(recipe_factory(), "--nproc_per_node", 2, env={"CUDA_VISIBLE_DEVICES": "2,3"})
    assert plan["env"][topology.VISIBLE] == "2,3"
