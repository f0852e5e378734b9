"""Failures never hang: a rank killed with SIGKILL, or one that raises, ends the whole run quickly, non-zero, with
the error said once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.helpers import FAULT, REPO, complete_steps, free_port, kill_tree, smoke_recipe

pytestmark = pytest.mark.integration

LONG = {"max_steps": 400, "save_steps": 4, "logging_steps": 1, "eval_strategy": "no"}


def start(recipe: Path, log: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "launcher", "launch", recipe, "--nproc_per_node", "2",
                             "--master_port", str(free_port())], cwd=REPO, start_new_session=True,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})


def start_training(recipe: Path, tmp_path: Path) -> subprocess.Popen:
    """`start`, then wait until training is under way (a checkpoint is complete)."""
    proc, deadline = start(recipe, tmp_path / "log"), time.monotonic() + 300
    while not complete_steps(tmp_path / "run"):
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "log").read_text()[-3000:]
        time.sleep(0.1)
    return proc


def ranks_of(recipe_dir: Path) -> list[psutil.Process]:
    """The worker processes of this test's run (found by the run directory in their command line)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "launcher.train" in cmdline and str(recipe_dir) in cmdline and "deepspeed.launcher" not in cmdline:
            found.append(proc)
    return found


def wait_bounded(proc: subprocess.Popen, seconds: float) -> tuple[int, float]:
    began = time.monotonic()
    try:
        code = proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        pytest.fail(f"the run hung: still running {seconds} s after the failure")
    return code, time.monotonic() - began


def test_sigkill_of_one_rank_ends_the_run(tmp_path):
    recipe = smoke_recipe(tmp_path, training=LONG)
    proc = start_training(recipe, tmp_path)
    victim = [p for p in ranks_of(tmp_path) if "--local_rank=1" in p.cmdline()]
    assert len(victim) == 1
    victim[0].kill()
    code, took = wait_bounded(proc, 60)
    assert code != 0
    assert "training failed" in (tmp_path / "log").read_text()
    time.sleep(1)
    assert not ranks_of(tmp_path), "a rank outlived the run"


def test_exception_on_one_rank_is_reported_once(tmp_path):
    (tmp_path / "fault").mkdir()
    (tmp_path / "fault" / "sitecustomize.py").write_text(FAULT)
    recipe = smoke_recipe(tmp_path, training=LONG)
    proc = start(recipe, tmp_path / "log", {"PYTHONPATH": str(tmp_path / "fault")})
    code, _ = wait_bounded(proc, 180)
    log = (tmp_path / "log").read_text()
    assert code != 0
    assert log.count("cannot read train.jsonl on this node") == 1, log[-3000:]
    assert "error: rank 1 (" in log and "failed: OSError: injected: cannot read train.jsonl on this node" in log
    assert "Traceback" not in log, log[-3000:]
    saved = tmp_path / "run" / "ranks" / "rank1.traceback"
    assert "Traceback" in saved.read_text() and f"[traceback: {saved}]" in log
    time.sleep(1)
    assert not ranks_of(tmp_path), "a rank outlived the run"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_launch_alone_stops_every_rank(tmp_path, sig):
    """kill PID or Ctrl-C reaching only `launch` (a scheduler, a wrapper script) leaves no rank running."""
    recipe = smoke_recipe(tmp_path, training=LONG)
    proc = start_training(recipe, tmp_path)
    assert len(ranks_of(tmp_path)) >= 2  # the ranks (and DeepSpeed's runner)
    proc.send_signal(sig)  # to launch's pid only, not its process group
    code, _ = wait_bounded(proc, 60)
    assert code == 128 + sig, (tmp_path / "log").read_text()[-3000:]
    deadline = time.monotonic() + 15
    while ranks_of(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not ranks_of(tmp_path), "a rank outlived the launch it was started by"
    assert "Traceback" not in (tmp_path / "log").read_text()
