"""Helpers that more than one test module uses: the repo root, a CLI runner, recipes derived from the shipped ones,
the checks and stand-ins of the unit tier, and the launch, resume and W&B helpers of the multi-process tiers.

Test modules import from here, never from one another (`from tests.helpers import cli, smoke_recipe`).  This module
starts nothing on import and imports nothing heavy (wandb, torch) at the top; tests/conftest.py registers it for
pytest's assertion rewriting, so a failed `assert` in a helper explains itself as one in a test does.  The
environment every test runs in (offline hub, per-session caches) is set up in tests/conftest.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "recipes" / "smoke.yaml"
SENTIMENT = REPO / "recipes" / "sentiment.yaml"
BASE = REPO / "recipes" / "sentiment" / "model"


# --- the command line and recipes ---------------------------------------------------------------------------------

def cli(*args: str, cwd: Path = REPO, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `python -m launcher ARGS` as a user would, capturing output."""
    return subprocess.run([sys.executable, "-m", "launcher", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def shipped_recipe(source: Path, tmp_path: Path, name: str = "recipe.yaml", drop: tuple[str, ...] = (),
                   **sections) -> Path:
    """A shipped recipe with sections updated (dicts) or replaced, `drop` keys ("run.name") removed, written to
    tmp_path with absolute paths and its run directory there."""
    raw = yaml.safe_load(source.read_text())
    raw["model"]["name_or_path"] = str(REPO / raw["model"]["name_or_path"])
    for spec in [*raw["data"]["train"], *raw["data"].get("eval", [])]:
        spec["path"] = str(REPO / spec["path"])
    if "/" in raw["deepspeed"]["config"]:  # a path into the checkout; a name (zero3) is a shipped config
        raw["deepspeed"]["config"] = str(REPO / raw["deepspeed"]["config"])
    raw["run"]["output_dir"] = str(tmp_path / "run")
    for section, value in sections.items():
        if isinstance(value, dict) and isinstance(raw.get(section), dict):
            raw[section].update(value)
        else:
            raw[section] = value
    for dotted in drop:
        section, key = dotted.split(".")
        del raw[section][key]
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def smoke_recipe(tmp_path: Path, name: str = "recipe.yaml", drop: tuple[str, ...] = (), **sections) -> Path:
    """The smoke recipe without its answer scoring, at the end of the run and at each evaluation (about 10 s a run;
    the shipped recipe's own test keeps both), unless `run` sets run.score_answers or run.eval_answers."""
    drop = (*(f"run.{k}" for k in ("score_answers", "eval_answers") if k not in sections.get("run", {})), *drop)
    return shipped_recipe(SMOKE, tmp_path, name, drop, **sections)


def sentiment_recipe(tmp_path: Path, drop: tuple[str, ...] = (), **sections) -> Path:
    return shipped_recipe(SENTIMENT, tmp_path, drop=drop, **sections)


# --- refusals and run directories (unit tier) ---------------------------------------------------------------------

def assert_rejected(result, *needles: str) -> None:
    assert result.returncode == 2, result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    for needle in needles:
        assert needle in lines[0], lines[0]


def fake_checkpoint(run_dir, step: int, world: int = 2, max_steps: int = 150, complete: bool = True):
    """A checkpoint directory as the worker leaves it, reduced to what resuming looks at first: its marker."""
    checkpoint = run_dir / "checkpoints" / f"checkpoint-{step}"
    checkpoint.mkdir(parents=True)
    if complete:
        marker = {"step": step, "max_steps": max_steps, "world_size": world}
        (checkpoint / "complete.json").write_text(json.dumps(marker))
    return checkpoint


# --- the Slurm job script against stand-ins (unit tier: no cluster) -----------------------------------------------

# srun stand-in: runs its command once per node of the allocation, each with its own SLURM_NODEID, like Slurm.
SRUN = """#!/bin/bash
nodes=$SLURM_NNODES
while [[ $1 == -* ]]; do [[ $1 == --nodes=1 ]] && nodes=1; shift; done
rc=0
for ((i = 0; i < nodes; i++)); do SLURM_NODEID=$i SLURMD_NODENAME=node$i "$@" || rc=$?; done
exit $rc
"""
SCONTROL = """#!/bin/bash
case "$1 $2" in
  "show hostnames") printf 'gpu-a\\ngpu-b\\n' ;;
  requeue*) echo "requeue $2" >> "$CALLS" ;;
esac
"""
# python stand-in for the ranks: records what each node was told to run, and the secret it can see
PYTHON = """#!/bin/bash
echo "node=$SLURM_NODEID secret=$WANDB_API_KEY args=$*" >> "$CALLS"
[[ -n ${STOP:-} && $3 == launch ]] && echo '{"step": 4}' > "$RUN_DIR/stopped.json"
[[ $3 == launch ]] && exit "${TRAIN_RC:-0}"
exit 0
"""


def stand_in(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text)
    path.chmod(0o755)
    return path


def stand_ins(tmp_path: Path, monkeypatch) -> Path:
    """srun, scontrol and the job's python as stand-ins that log their calls; their directory."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stand_in(bin_dir, "srun", SRUN)
    stand_in(bin_dir, "scontrol", SCONTROL)
    monkeypatch.setattr(sys, "executable", str(stand_in(bin_dir, "python", PYTHON)))
    return bin_dir


def run_batch_script(script: Path, bin_dir: Path, env: dict) -> tuple[int, str, list[str]]:
    """Run a job script as Slurm's batch shell would, with the stand-ins first on PATH: (rc, output, calls)."""
    calls = bin_dir.parent / "calls"
    calls.unlink(missing_ok=True)
    environ = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "gpu-[a-b]",
               "SLURM_NNODES": "2", "CALLS": str(calls), **env}
    done = subprocess.run(["bash", script], capture_output=True, text=True, env=environ, timeout=30)
    return done.returncode, done.stdout + done.stderr, calls.read_text().splitlines() if calls.exists() else []


# --- real multi-process runs (integration and slurm tiers) --------------------------------------------------------

QUICK = {"max_steps": 20, "logging_steps": 5, "eval_strategy": "no", "save_steps": 20}
GATHER = {"zero_optimization": {"stage3_gather_16bit_weights_on_model_save": True}}
STEPS = {"max_steps": 16, "save_steps": 4, "logging_steps": 1, "eval_strategy": "no", "save_total_limit": 2}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(recipe: Path, *flags, env: dict | None = None) -> tuple[subprocess.CompletedProcess, dict]:
    """Launch, and return the result with the plan that `plan` prints for the same arguments."""
    args = [recipe, "--master_port", free_port(), *flags]
    planned = cli("plan", *args, "--format", "json")
    assert planned.returncode == 0, planned.stderr
    result = cli("launch", *args, env=env)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-6000:]
    return result, json.loads(planned.stdout)


def last_checkpoint(run_dir: Path) -> Path:
    return max((run_dir / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))


def assert_every_rank_wrote_shards(run_dir: Path, world: int) -> None:
    checkpoint = last_checkpoint(run_dir)
    step_dir = checkpoint / (checkpoint / "latest").read_text().strip()
    for rank in range(world):
        shards = list(step_dir.glob(f"*zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"))
        assert shards and shards[0].stat().st_size > 0, f"rank {rank} wrote no optimizer shard in {step_dir}"
    assert not list(step_dir.glob(f"*zero_pp_rank_{world}_*"))


def complete_steps(run_dir: Path) -> list[int]:
    markers = (run_dir / "checkpoints").glob("checkpoint-*/complete.json")
    return sorted(int(p.parent.name.split("-")[1]) for p in markers)


def kill_after_first_checkpoint(recipe: Path, run_dir: Path, env: dict | None = None) -> int:
    """Start a launch, SIGKILL the launcher and every rank once a checkpoint is complete; return its step."""
    proc = subprocess.Popen([sys.executable, "-m", "launcher", "launch", recipe, "--nproc_per_node", "2",
                             "--master_port", str(free_port())], cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **(env or {})})
    deadline = time.monotonic() + 300
    while not complete_steps(run_dir):
        assert proc.poll() is None and time.monotonic() < deadline, "no complete checkpoint before the run ended"
        time.sleep(0.05)
    kill_tree(proc.pid)
    proc.wait()
    return complete_steps(run_dir)[-1]


def kill_tree(pid: int, sig: int = signal.SIGKILL) -> None:
    """A process and all its descendants: `launch` starts DeepSpeed's runner in a process group of its own."""
    import psutil

    with contextlib.suppress(psutil.NoSuchProcess):
        for proc in [*psutil.Process(pid).children(recursive=True), psutil.Process(pid)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.send_signal(sig)


def on_import(module: str, patch: str, when: str = "True") -> str:
    """The source of a sitecustomize.py that, put on PYTHONPATH, runs `patch` (Python code that sees the freshly
    imported module as `module`) in every process of the run where `when` holds: test-only fault injection, as the
    launcher has no such switch."""
    body = textwrap.indent(textwrap.dedent(patch).strip("\n"), " " * 16)
    return textwrap.dedent('''
        import os, sys
        if %s:
            class _OnImport:
                def find_spec(self, name, path, target=None):
                    if name != %r:
                        return None
                    sys.meta_path.remove(self)
                    import importlib.util
                    spec = importlib.util.find_spec(name)
                    run_module = spec.loader.exec_module
                    def exec_module(module):
                        run_module(module)
        %s
                    spec.loader.exec_module = exec_module
                    return spec
            sys.meta_path.insert(0, _OnImport())
    ''') % (when, module, body)


# Rank 1 (and only rank 1) fails to load its data, as when a node cannot read the dataset.
FAULT = on_import("launcher.data", '''
    def load(*args, **kwargs):
        raise OSError("injected: cannot read train.jsonl on this node")
    module.load = load
''', when='os.environ.get("RANK") == "1"')


# --- W&B ----------------------------------------------------------------------------------------------------------

SECRETS = {"WANDB_API_KEY": "fake-wandb-key-0123456789abcdef", "HF_TOKEN": "hf_fakeTokenValue12345",
           "MY_SERVICE_TOKEN": "svc-token-value-777", "DB_SECRET": "db-secret-value-888",
           "S3_ACCESS_KEY": "s3-key-value-999"}


def records(wandb_file: Path) -> list:
    """Records of a `.wandb` file. wandb 0.31 ships no Python reader for it (its reader lives in the Go core), so
    this undoes only the framing (LevelDB log blocks after a 7-byte header) and lets wandb's own protobuf classes
    decode every record."""
    from wandb.proto import wandb_internal_pb2  # here, not at the top: importing helpers must stay cheap

    data, block, pos, parts, out = wandb_file.read_bytes(), 32768, 7, [], []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:  # zero padding to the end of the block
            pos += left
            continue
        parts.append(data[pos + 7:pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            out.append(record)
            parts = []
    return out


def history_of(recs: list) -> list[dict]:
    return [{"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item}
            for r in recs if r.WhichOneof("record_type") == "history"]
