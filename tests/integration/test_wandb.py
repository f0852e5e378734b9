"""W&B in offline mode on a real 2-rank run: one W&B run per training run, continued after a crash and resume,
holding the resolved recipe and throughput; and no secret from the environment in anything written."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from wandb.proto import wandb_internal_pb2

from tests.conftest import smoke_recipe
from tests.integration.test_deepspeed_launch import launch
from tests.integration.test_resume import STEPS, kill_after_first_checkpoint

pytestmark = pytest.mark.integration

SECRETS = {"WANDB_API_KEY": "fake-wandb-key-0123456789abcdef", "HF_TOKEN": "hf_fakeTokenValue12345",
           "MY_SERVICE_TOKEN": "svc-token-value-777", "DB_SECRET": "db-secret-value-888",
           "S3_ACCESS_KEY": "s3-key-value-999"}


def records(wandb_file: Path) -> list:
    """Records of a `.wandb` file. wandb 0.31 ships no Python reader for it (its reader lives in the Go core), so
    this undoes only the framing (LevelDB log blocks after a 7-byte header) and lets wandb's own protobuf classes
    decode every record."""
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


def config_of(recs: list) -> dict:
    config = {}
    for r in recs:
        kind = r.WhichOneof("record_type")
        items = r.run.config.update if kind == "run" else r.config.update if kind == "config" else []
        config.update({item.key: json.loads(item.value_json) for item in items})
    return config


def history_of(recs: list) -> list[dict]:
    return [{"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item}
            for r in recs if r.WhichOneof("record_type") == "history"]


def test_one_wandb_run_across_a_resume_with_config_history_and_no_secrets(tmp_path):
    wandb = {"project": "launcher-tests", "mode": "offline", "tags": ["ci"], "log_model": True}
    recipe = smoke_recipe(tmp_path, training=STEPS, wandb=wandb)
    run_dir = tmp_path / "run"
    k = kill_after_first_checkpoint(recipe, run_dir, env=SECRETS)
    first_id = json.loads((run_dir / "wandb.json").read_text())["id"]
    result, _ = launch(recipe, "--nproc_per_node", 2, env=SECRETS)

    # one W&B run: every start of the job (2 here) wrote one offline segment, all with the same id; no other rank
    stored = json.loads((run_dir / "wandb.json").read_text())
    assert stored["id"] == first_id and stored["mode"] == "offline"
    segments = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(segments) == 2 and all(s.name.endswith(f"-{first_id}") for s in segments)
    assert f"W&B run {first_id}" in result.stdout

    recs = records(next(segments[-1].glob("run-*.wandb")))
    config = config_of(recs)
    assert config["recipe"]["run"]["name"] == "smoke" and config["recipe"]["training"]["max_steps"] == 16
    assert config["run_dir"] == str(run_dir) and config["world_size"] == 2
    assert config["deepspeed"]["zero_optimization"]["stage"] == 3
    history = history_of(recs)
    trained = [h for h in history if "train/loss" in h]
    assert trained and all(h["train/tokens_per_second"] > 0 for h in trained)
    # log_model: the consolidated model went in as an artifact, recorded for `wandb sync`
    artifacts = [r.artifact for r in recs if r.WhichOneof("record_type") == "artifact"]
    assert [a.type for a in artifacts] == ["model"]
    assert "config.json" in {f.path for f in artifacts[0].manifest.contents}

    # the resumed segment continues the step axis where the checkpoint left it (what the killed segment had not yet
    # flushed to its file died with it: wandb-core buffers; a USR1 stop finishes the run cleanly instead)
    assert [h["train/global_step"] for h in trained] == list(range(k + 1, 17))

    # secrets: nowhere in the run directory (checkpoints, W&B files, logs), nor in what the launcher printed
    printed = result.stdout + result.stderr
    for path in [p for p in tmp_path.rglob("*") if p.is_file()]:
        content = path.read_bytes()
        for name, value in SECRETS.items():
            assert value.encode() not in content, f"{name} leaked into {path}"
    for name, value in SECRETS.items():
        assert value not in printed, f"{name} printed"
