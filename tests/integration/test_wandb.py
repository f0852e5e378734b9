"""W&B in offline mode on a real 2-rank run: one W&B run per training run, continued after a crash and resume,
holding the resolved recipe and throughput; and no secret from the environment in anything written."""

from __future__ import annotations

import json

import pytest

from tests.helpers import SECRETS, STEPS, history_of, kill_after_first_checkpoint, launch, records, smoke_recipe

pytestmark = pytest.mark.integration


def config_of(recs: list) -> dict:
    config = {}
    for r in recs:
        kind = r.WhichOneof("record_type")
        items = r.run.config.update if kind == "run" else r.config.update if kind == "config" else []
        config.update({item.key: json.loads(item.value_json) for item in items})
    return config


def test_one_wandb_run_across_a_resume_with_config_history_and_no_secrets(tmp_path):
    wandb = {"mode": "offline", "tags": ["ci"], "log_model": True}  # no project: it defaults to run.name
    recipe = smoke_recipe(tmp_path, training=STEPS, wandb=wandb)
    run_dir = tmp_path / "run"
    k = kill_after_first_checkpoint(recipe, run_dir, env=SECRETS)
    first_id = json.loads((run_dir / "wandb.json").read_text())["id"]
    result, _ = launch(recipe, "--nproc_per_node", 2, env=SECRETS)

    # one W&B run: every start of the job (2 here) wrote one offline segment, all with the same id; no other rank
    stored = json.loads((run_dir / "wandb.json").read_text())
    assert stored["id"] == first_id and stored["mode"] == "offline" and stored["project"] == "smoke"
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
    assert all(0 <= h["train/padding_share"] < 0.5 for h in trained)  # chats of 12 or 13 tokens, padded in batches
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
