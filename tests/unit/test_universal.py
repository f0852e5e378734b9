"""Resuming on another number of ranks: a universal conversion is loaded only when its marker vouches for every file
(one cut short is done again, one changed since is refused), a failed conversion says so in one line and leaves the
checkpoint as it was, and the global batch, not the accumulation, is what a resumed run must keep."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from launcher import universal
from launcher.errors import RecipeError
from tests.helpers import assert_rejected, cli, fake_checkpoint


def converted(tmp_path: Path) -> Path:
    """A checkpoint with a universal conversion as convert() leaves it (files, then the marker)."""
    checkpoint = fake_checkpoint(tmp_path / "run", 10)
    (checkpoint / "latest").write_text("global_step10")
    folder = checkpoint / "global_step10_universal" / "zero" / "lm_head.weight"
    folder.mkdir(parents=True)
    (folder / "fp32.pt").write_bytes(b"x" * 100)
    (checkpoint / universal.LATEST).write_text("global_step10_universal")
    files = {"global_step10_universal/zero/lm_head.weight/fp32.pt": 100}
    (checkpoint / universal.MARKER).write_text(json.dumps({"tag": "global_step10_universal", "files": files}))
    return checkpoint


def test_a_conversion_is_ready_only_with_its_marker(tmp_path):
    checkpoint = converted(tmp_path)
    assert universal.ready(checkpoint)
    (checkpoint / universal.MARKER).unlink()  # cut short before its marker: not loaded, converted again
    assert not universal.ready(checkpoint)


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_a_conversion_changed_since_is_never_loaded(tmp_path, damage):
    checkpoint = converted(tmp_path)
    shard = checkpoint / "global_step10_universal" / "zero" / "lm_head.weight" / "fp32.pt"
    shard.write_bytes(b"x" * 10) if damage == "truncated" else shard.unlink()
    with pytest.raises(RecipeError, match="fp32.pt (has 10 bytes|is missing).*converted again"):
        universal.ready(checkpoint)


def test_a_failed_conversion_leaves_the_checkpoint_unchanged(tmp_path, capsys):
    """DeepSpeed's real converter on shards that are not there: one line naming the checkpoint and the log, no
    staging folder or half conversion left behind."""
    checkpoint = fake_checkpoint(tmp_path / "run", 10)
    (checkpoint / "latest").write_text("global_step10")
    (checkpoint / "global_step10").mkdir()
    before = sorted(p.name for p in checkpoint.iterdir())
    with pytest.raises(RecipeError, match=r"checkpoint-10: DeepSpeed's universal conversion failed .*all of it: "):
        universal.convert(checkpoint)
    assert sorted(p.name for p in checkpoint.iterdir()) == before
    assert "Traceback" not in capsys.readouterr().out
    assert (tmp_path / "run" / "logs" / "universal-checkpoint-10.log").is_file()


def test_a_resume_on_another_world_size_keeps_the_global_batch(recipe_factory, tmp_path):
    checkpoint = fake_checkpoint(tmp_path / "run", 75, world=4)
    marker = json.loads((checkpoint / "complete.json").read_text())
    (checkpoint / "complete.json").write_text(json.dumps({**marker, "global_batch": 64}))
    assert_rejected(cli("launch", recipe_factory(), "--nproc_per_node", 2), "checkpoint-75",
                    "trained at global batch 64 (4 ranks)", "run.global_batch_size: 64")


def test_submit_says_a_conversion_comes_first(recipe_factory, tmp_path):
    """The same global batch on another number of ranks: the start continues, from the universal format."""
    fake_checkpoint(tmp_path / "run", 75, world=4)
    result = cli("submit", recipe_factory(), "--nodes", 1, "--gpus_per_node", 2, "--dry_run")
    assert result.returncode == 0, result.stderr
    assert "saved by 4 ranks; this run has 2: from DeepSpeed's universal format" in result.stdout
