"""The command line itself: its command and flag set, --help on every command, and `launcher keys`."""

from __future__ import annotations

import dataclasses
import inspect
import subprocess
import sys

import pytest

from launcher.cli import COMMANDS
from launcher.schema import RunSection
from tests.helpers import REPO, cli

# Written out by hand so that any change to the CLI is a deliberate one: update this with the command.
EXPECTED = {
    "plan": ["recipe", "nproc_per_node", "nnodes", "node_rank", "master_addr", "master_port", "hostfile", "format",
             "**overrides"],
    "launch": ["recipe", "nproc_per_node", "nnodes", "node_rank", "master_addr", "master_port", "hostfile",
               "dry_run", "tiny", "verbose", "**overrides"],
    "submit": ["recipe", "nodes", "gpus_per_node", "partition", "time", "account", "qos", "dry_run", "preflight",
               "tiny", "**overrides"],
    "preprocess": ["recipe", "**overrides"],
    "train": ["recipe", "dry_run", "tiny", "nproc_per_node", "nnodes", "verbose", "**overrides"],
    "consolidate": ["checkpoint", "output", "dtype", "max_shard_size", "base_model", "overwrite"],
    "evaluate": ["model_dir", "data", "split", "output", "batch_size", "max_rows", "prompts"],
    "sweep": ["recipe", "grid", "random", "space", "seed", "nproc_per_node", "master_port", "slurm", "nodes",
              "gpus_per_node", "partition", "time", "account", "qos", "max_parallel", "dry_run", "**overrides"],
    "sweep_report": ["sweep_dir", "metric", "format"],
    "keys": ["section"],
}
OVERRIDE_LINE = "Recipe keys are overridden as --section.key=value"


def _params(fn) -> list[str]:
    return [("**" if p.kind is p.VAR_KEYWORD else "") + p.name for p in inspect.signature(fn).parameters.values()]


def _ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr
    assert "INFO: Showing help" not in result.stdout + result.stderr
    return result.stdout


def test_commands_and_flags_are_frozen():
    assert {name: _params(fn) for name, fn in COMMANDS.items()} == EXPECTED


@pytest.mark.parametrize("args", [(), ("--help",), ("-h",)])
def test_top_level_help(args):
    out = _ok(cli(*args))
    assert out.startswith("usage: launcher COMMAND")
    for name in EXPECTED:
        assert f"\n  {name} " in out
    assert "launcher keys" in out


@pytest.mark.parametrize("command", EXPECTED)
def test_command_help(command):
    out = _ok(cli(command, "--help"))
    fn = COMMANDS[command]
    assert inspect.getdoc(fn).splitlines()[0] in out
    for param in inspect.signature(fn).parameters.values():
        if param.default is not param.empty:
            assert f"--{param.name}={param.default}" in out
        elif param.kind is not param.VAR_KEYWORD:
            assert param.name.upper() in out
    assert (OVERRIDE_LINE in out) == ("recipe" in EXPECTED[command])


def test_help_anywhere_after_the_command():
    assert _ok(cli("plan", "recipes/smoke.yaml", "-h")) == _ok(cli("plan", "--help"))


def _schema_doc(cls: type, name: str) -> str:
    return next(f.metadata["doc"] for f in dataclasses.fields(cls) if f.name == name)


def _line(out: str, key: str) -> str:
    return next(line for line in out.splitlines() if line.split()[0] == key)


def test_keys_lists_schema_docs_and_sftconfig_defaults():
    out = _ok(cli("keys"))
    resume = _line(out, "run.resume")
    assert '= "auto"' in resume and resume.endswith(_schema_doc(RunSection, "resume"))
    assert '= "train"' in _line(out, "data.train.<i>.split")
    # TRL's SFTConfig overrides TrainingArguments' 5e-5 (trl/trainer/sft_config.py)
    assert "= 2e-05" in _line(out, "training.learning_rate")
    assert "The initial learning rate for AdamW." in _line(out, "training.learning_rate")
    assert "= 8" in _line(out, "training.per_device_train_batch_size")
    assert "training.output_dir" not in out  # set by the launcher; a recipe may not


def test_keys_of_one_section():
    out = _ok(cli("keys", "lora"))
    assert {line.split()[0].split(".")[0] for line in out.splitlines()} == {"lora"}
    assert "= 16" in _line(out, "lora.r") and "LoRA rank." in _line(out, "lora.r")


def test_keys_of_an_unknown_section():
    result = cli("keys", "nosuch")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "'nosuch'" in result.stderr
    assert "run, model, data" in result.stderr and "lora" in result.stderr and "training" in result.stderr


def test_help_and_keys_import_no_torch():
    code = ("import sys\nfrom launcher import cli\n"
            "for argv in ([], ['plan', '--help'], ['keys']):\n"
            "    sys.argv = ['launcher', *argv]\n"
            "    try:\n        cli.main()\n    except SystemExit:\n        pass\n"
            "print('heavy:', sorted({'torch', 'deepspeed', 'transformers', 'trl'} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "heavy: []"
