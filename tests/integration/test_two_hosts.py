"""Runs that span hosts which really differ (tests/two_hosts.py): their own addresses and loopbacks, host names,
and, where a test says so, their own view of the disk. What one host cannot show: where the ranks rendezvous,
what environment reaches ranks started over ssh, and a run directory one node does not see."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import QUICK, REPO, free_port, kill_tree, smoke_recipe
from tests.two_hosts import TwoHosts

pytestmark = pytest.mark.integration

SECRET = "wandb-key-that-must-stay-secret-1234567890"
SHORT = {**QUICK, "max_steps": 4, "save_steps": 4}


@pytest.fixture(scope="module")
def hosts():
    two = TwoHosts().start()
    yield two
    two.stop()


def launch(*args, env: dict, timeout: float) -> tuple[int, str]:
    """`launcher launch ARGS` as a user types it; the whole process tree is killed if it runs past `timeout`."""
    proc = subprocess.Popen([sys.executable, "-m", "launcher", "launch", *map(str, args)], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, **env})
    try:
        out = proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out = proc.communicate()[0]
        pytest.fail(f"the run hung: still running after {timeout} s\n{out[-4000:]}")
    return proc.returncode, out


def test_hostfile_start_meets_on_the_first_host_and_passes_the_environment(hosts, tmp_path):
    """Over ssh, without --master_addr: the ranks meet at nodeA's address (not each its own 127.0.0.1), get the
    launching shell's thread count, and never see a secret, which is neither written nor printed."""
    recipe = smoke_recipe(tmp_path, training=SHORT)
    env = {"OMP_NUM_THREADS": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf-datasets"), "WANDB_API_KEY": SECRET}
    code, out = launch(recipe, "--hostfile", hosts.hostfile(tmp_path / "hostfile"), "--master_port", free_port(),
                       env=env, timeout=420)
    assert code == 0, out[-4000:]
    run_dir = tmp_path / "run"
    records = [json.loads((run_dir / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["host"] for r in records] == ["nodeA", "nodeB"]
    assert [r["threads"] for r in records] == [1, 1]  # DeepSpeed alone passes no OMP_NUM_THREADS over ssh
    assert (tmp_path / "hf-datasets").is_dir()  # the ranks used the cache named here, not ~/.cache
    assert "not passed to the hosts over ssh: WANDB_API_KEY" in out
    written = [p for p in run_dir.rglob("*") if p.is_file() and p.stat().st_size < 10**6]
    assert not [p for p in written if SECRET in p.read_text(errors="ignore")]
    assert SECRET not in out


def test_a_rank_whose_host_lacks_the_files_stops_the_run_and_is_named(hosts, tmp_path):
    """nodeB does not see the test's directory (the recipe, the data, the run directory): the error found by its
    rank alone (rank 1) reaches the user in one line naming the host, and the run ends instead of rank 0 waiting
    for rank 1 in the process group until the timeout."""
    recipe = smoke_recipe(tmp_path, training=SHORT)
    hosts.start_sshd("B", hide=[tmp_path])
    try:
        began = time.monotonic()
        code, out = launch(recipe, "--hostfile", hosts.hostfile(tmp_path / "hostfile"),
                           "--master_port", free_port(), env={"OMP_NUM_THREADS": "1"}, timeout=240)
    finally:
        hosts.start_sshd("B")
    assert code == 2, out[-4000:]
    lines = [line for line in out.splitlines() if line.startswith("nodeA: error:")]  # pdsh prefixes the host
    assert len(lines) == 1 and "nodeB (rank 1)" in lines[0] and "recipe.yaml" in lines[0], out[-4000:]
    assert "error:" not in out.replace(lines[0], "")
    assert "Traceback" not in out
    assert time.monotonic() - began < 120


def test_nodes_that_see_different_run_directories_stop_within_seconds(tmp_path):
    """Two nodes started without ssh (--nnodes 2), node 1 in a mount namespace of its own where the run directory
    is another, empty one (a node-local disk): each node's launch writes the recipe snapshot into the directory it
    sees, so every rank's start-up checks pass, yet checkpoints would be split between two disks. The run stops
    before training with one line naming the node that cannot see rank 0's run directory."""
    recipe = smoke_recipe(tmp_path, training=SHORT)
    (tmp_path / "run").mkdir()
    (tmp_path / "elsewhere").mkdir()
    port = free_port()
    common = ["launch", recipe, "--nnodes", 2, "--nproc_per_node", 1, "--master_addr", "127.0.0.1",
              "--master_port", port]
    node1 = " ".join(map(str, [sys.executable, "-m", "launcher", *common, "--node_rank", 1]))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen([sys.executable, "-m", "launcher", *map(str, common), "--node_rank", "0"], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env),
             subprocess.Popen(["unshare", "--mount", "--uts", "sh", "-c", f"hostname node-1 && mount --bind "
                               f"{tmp_path / 'elsewhere'} {tmp_path / 'run'} && exec {node1}"], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)]
    try:
        outputs = [node.communicate(timeout=240)[0] for node in nodes]
    except subprocess.TimeoutExpired:
        for node in nodes:
            kill_tree(node.pid)
        pytest.fail("the run hung although node 1 sees another run directory")
    assert [n.returncode for n in nodes] == [2, 2], outputs[0][-3000:] + outputs[1][-3000:]
    lines = [line for line in outputs[0].splitlines() if line.startswith("error:")]
    assert len(lines) == 1, outputs[0][-3000:]
    assert "node-1 (rank 1)" in lines[0] and "does not see the run directory" in lines[0]
    assert not list(Path(tmp_path / "run").glob("checkpoints/checkpoint-*")), "training started anyway"
