"""Tokenize once (launcher/tokenized.py): the cache key follows what the tokens depend on and nothing else, an entry
whose manifest does not match is never used, concurrent writers leave one good entry, and `launcher preprocess`
fills the cache the ranks read. Real tokenizer, real rows of the smoke data, TRL's own preparation."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from launcher import pipeline, tokenized
from launcher import recipe as recipes
from launcher.errors import RecipeError
from launcher.topology import Topology
from tests.helpers import REPO, assert_rejected, cli, sentiment_recipe, smoke_recipe

SMOKE_DATA = REPO / "recipes" / "smoke" / "data" / "train.jsonl"
ROWS = 40


def rows_file(path: Path, edit: int | None = None) -> Path:
    """The first ROWS rows of the smoke data; edit: that row's last message changed by one character."""
    rows = [json.loads(line) for line in SMOKE_DATA.read_text().splitlines()[:ROWS]]
    if edit is not None:
        rows[edit]["messages"][-1]["content"] += "0"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def small(tmp_path) -> Path:
    """The smoke recipe on ROWS rows, a tenth of them held out for evaluation."""
    return smoke_recipe(tmp_path, data={"train": [{"path": str(rows_file(tmp_path / "rows.jsonl"))}], "eval": [],
                                        "eval_fraction": 0.1})


def gate(recipe: Path, **overrides) -> pipeline.Run:
    return pipeline.prepare(str(recipe), {k.replace("__", "."): v for k, v in overrides.items()}, Topology((1,)))


def keys(recipe: Path, **overrides) -> dict[str, str]:
    """The cache key of each split, computed as preprocess and the worker's trainer compute it."""
    got = tokenized.inputs(gate(recipe, **overrides), str(recipe))
    return {split: tokenized.key_of(tokenized.key_fields(got.owner, rows, got.tokenizer, got.args, packing, split))
            for split, rows, packing in got.splits}


def records(run_dir: Path) -> list[dict]:
    path = run_dir / tokenized.RECORD
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def sources(run_dir: Path) -> list[tuple[str, bool]]:
    """(split, from the cache?) of each preparation recorded in the run directory, in order."""
    return [(r["split"], r["from_cache"]) for r in records(run_dir)]


def preprocess(recipe: Path, **overrides) -> pipeline.Run:
    run = gate(recipe, **overrides)
    tokenized.preprocess(run, str(recipe))
    return run


# --- the key ------------------------------------------------------------------------------------------------------

def test_the_key_follows_the_tokens_not_the_rest_of_the_recipe(small, tmp_path):
    base = keys(small)
    assert set(base) == {"train", "eval"} and base["train"] != base["eval"]
    # the same key again, and for what does not change a token: learning rate, steps, run directory, cache place
    assert keys(small) == base
    assert keys(small, training__learning_rate=1e-4, training__max_steps=7, run__output_dir=str(tmp_path / "other"),
                data__cache_dir=str(tmp_path / "elsewhere")) == base
    # the same rows in another file, written later: content, not names or times
    time.sleep(0.01)
    copy = rows_file(tmp_path / "copy" / "rows.jsonl")
    assert keys(small, data__train__0__path=str(copy)) == base
    # what changes the tokens changes the key
    changed = {"max_length": keys(small, training__max_length=32),
               "one row's content": keys(small, data__train__0__path=str(rows_file(tmp_path / "e" / "rows.jsonl", 5))),
               "packing": keys(small, training__packing=True),
               "assistant_only_loss": keys(small, training__assistant_only_loss=False),
               "seed (the held-out split)": keys(small, training__seed=1),
               "shuffle_dataset": keys(small, training__shuffle_dataset=True)}
    for what, key in changed.items():
        assert key["train"] != base["train"], f"{what} left the train key unchanged"


def test_the_key_holds_the_tokenizer_and_the_template_trl_applies(small):
    got = tokenized.inputs(gate(small), str(small))
    split, rows, packing = got.splits[0]
    fields = tokenized.key_fields(got.owner, rows, got.tokenizer, got.args, packing, split)
    # the smoke template has {% generation %} markers: TRL applies the tokenizer's own, no training template
    assert got.owner.chat_template is None and fields["chat_template"] is None
    assert fields["versions"]["trl"] and fields["args"]["max_length"] == 64 and fields["split"] == "train"
    swapped = tokenized.StandIn(got.owner._tokenizer, "{{ messages }}", got.owner.completion_only_loss)
    assert tokenized.key_fields(swapped, rows, got.tokenizer, got.args, packing, split) != fields
    got.tokenizer.add_tokens(["<|new|>"])
    assert tokenized.key_fields(got.owner, rows, got.tokenizer, got.args, packing, split)["tokenizer"] \
        != fields["tokenizer"]


# --- the cache ----------------------------------------------------------------------------------------------------

def test_a_second_preprocess_loads_what_the_first_stored(small, tmp_path, capfd):
    run = preprocess(small)
    first = capfd.readouterr().out
    cache = tmp_path / "tokenized"
    assert f"tokenizing train set: 36 rows, cached at {cache}/train-" in first
    assert sorted(p.name.split("-")[0] for p in cache.iterdir()) == ["eval", "train"]  # no temporary left behind
    preprocess(small, training__learning_rate=1e-4)
    second = capfd.readouterr().out
    assert f"data: train set tokenized from cache {cache}/train-" in second and "tokenizing" not in second
    assert sources(run.run_dir) == [("train", False), ("eval", False), ("train", True), ("eval", True)]


def test_an_entry_whose_manifest_does_not_match_is_not_used(small, tmp_path):
    run = preprocess(small)
    entry = Path(records(run.run_dir)[0]["entry"])
    manifest = json.loads((entry / tokenized.MANIFEST).read_text())
    expected = manifest["fields"]

    edited = {**manifest, "fields": {**expected, "args": {**expected["args"], "max_length": 4096}}}
    (entry / tokenized.MANIFEST).write_text(json.dumps(edited))  # an edited manifest: the key no longer matches
    preprocess(small)
    assert sources(run.run_dir)[-2:] == [("train", False), ("eval", True)]  # tokenized again, and replaced
    assert json.loads((entry / tokenized.MANIFEST).read_text())["fields"] == expected

    (entry / tokenized.MANIFEST).write_text("{not json")  # damaged
    preprocess(small)
    assert sources(run.run_dir)[-2] == ("train", False)

    # another tokenizer's entry in this entry's place (a copy, a clash of the name's prefix): not used
    got = tokenized.inputs(gate(small), str(small))
    split, rows, packing = got.splits[0]
    fields = tokenized.key_fields(got.owner, rows, got.tokenizer, got.args, packing, split)
    assert tokenized.lookup(tmp_path / "tokenized", fields) is not None
    got.tokenizer.add_tokens(["<|new|>"])
    other = tokenized.key_fields(got.owner, rows, got.tokenizer, got.args, packing, split)
    assert tokenized.lookup(tmp_path / "tokenized", other) is None
    os.rename(entry, tokenized.entry_dir(tmp_path / "tokenized", other))
    assert tokenized.lookup(tmp_path / "tokenized", other) is None

    # data files gone from an entry: not used either
    preprocess(small)
    next((entry / "data").glob("*.arrow")).unlink()
    assert tokenized.lookup(tmp_path / "tokenized", fields) is None


def test_concurrent_writers_leave_one_good_entry(small, tmp_path):
    got = tokenized.inputs(gate(small), str(small))
    split, rows, packing = got.splits[0]
    cache = tmp_path / "cache"
    done = tokenized.prepare_here(got.owner, rows, got.tokenizer, got.args, packing, split, cache, None)
    fields = tokenized.key_fields(got.owner, rows, got.tokenizer, got.args, packing, split)
    entry = tokenized.store(cache, fields, done, len(rows))
    created = json.loads((entry / tokenized.MANIFEST).read_text())["created"]
    inode = entry.stat().st_ino
    assert tokenized.store(cache, fields, done, len(rows)) == entry  # the loser drops its copy
    assert entry.stat().st_ino == inode and json.loads((entry / tokenized.MANIFEST).read_text())["created"] == created
    assert [p.name for p in cache.iterdir()] == [entry.name]
    loaded = tokenized.lookup(cache, fields)
    assert loaded is not None and loaded["input_ids"] == done["input_ids"] and loaded["labels"] == done["labels"]


# --- the command and the recipe key --------------------------------------------------------------------------------

def test_preprocess_command_tokenizes_once(small, tmp_path):
    first = cli("preprocess", small)
    assert first.returncode == 0, first.stderr
    assert f"tokenizing train set: 36 rows, cached at {tmp_path / 'tokenized'}/train-" in first.stdout
    again = cli("preprocess", small, "--training.learning_rate=1e-4")
    assert again.returncode == 0, again.stderr
    assert "data: train set tokenized from cache" in again.stdout and "tokenizing" not in again.stdout
    assert sources(tmp_path / "run") == [("train", False), ("eval", False), ("train", True), ("eval", True)]


def test_preprocess_of_a_cache_dir_that_cannot_be_written_is_one_line(small, tmp_path):
    (tmp_path / "a-file").write_text("")
    result = cli("preprocess", small, f"--data.cache_dir={tmp_path / 'a-file' / 'cache'}")
    assert_rejected(result, "data.cache_dir", str(tmp_path / "a-file" / "cache"), "cannot be written")


def test_preprocess_leaves_classification_to_its_trainer(tmp_path):
    result = cli("preprocess", sentiment_recipe(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines() == [
        "preprocess: task classification tokenizes in its trainer, on the ranks; nothing to do here"]
    assert not (tmp_path / "tokenized").exists()


def test_cache_dir_key(small, tmp_path, monkeypatch):
    recipe = recipes.load(str(small))
    assert recipe.data.cache_dir is None and tokenized.cache_dir(recipe) == tmp_path / "tokenized"
    monkeypatch.chdir(tmp_path)
    assert recipes.load(str(small), {"data.cache_dir": "shared/tok"}).data.cache_dir == str(tmp_path / "shared/tok")
    with pytest.raises(RecipeError, match="data.cache_dir is empty"):
        recipes.load(str(small), {"data.cache_dir": " "})
