"""Datasets: TRL's three formats, column mapping, weighted mixing, held-out eval, and bad rows named by number."""

from __future__ import annotations

import json

import pytest

from launcher import data
from launcher import recipe as recipes
from launcher.errors import RecipeError


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def chat(i):
    return {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}


def load(recipe_factory, **data_section):
    path = recipe_factory(data={"eval": [], "eval_fraction": 0.0, **data_section}, training={"eval_strategy": "no"})
    return data.load(recipes.load(str(path)), str(path), seed=0)


def test_prompt_completion_and_text_formats(recipe_factory, tmp_path):
    pc = jsonl(tmp_path / "pc.jsonl", [{"prompt": f"p{i}", "completion": f"c{i}", "extra": 1} for i in range(4)])
    train, evaluation = load(recipe_factory, train=[{"path": pc}])
    assert train.column_names == ["prompt", "completion"] and len(train) == 4 and evaluation is None
    text = jsonl(tmp_path / "t.jsonl", [{"text": f"t{i}"} for i in range(3)])
    assert load(recipe_factory, train=[{"path": text}])[0].column_names == ["text"]


def test_column_mapping(recipe_factory, tmp_path):
    rows = [{"conversations": chat(i)["messages"]} for i in range(3)]
    train, _ = load(recipe_factory, train=[{"path": jsonl(tmp_path / "c.jsonl", rows),
                                            "columns": {"messages": "conversations"}}])
    assert train.column_names == ["messages"] and train[0]["messages"][1]["content"] == "a0"


def test_weights_mix_and_eval_fraction(recipe_factory, tmp_path):
    a = jsonl(tmp_path / "a.jsonl", [chat(i) for i in range(10)])
    b = jsonl(tmp_path / "b.jsonl", [chat(100 + i) for i in range(3)])
    train, evaluation = load(recipe_factory, train=[{"path": a, "weight": 0.5}, {"path": b, "weight": 2}],
                             eval_fraction=0.25)
    assert len(train) + len(evaluation) == 5 + 6
    assert len(evaluation) == 3  # ceil(11 * 0.25), datasets' rounding


def test_separate_eval_set(recipe_factory, tmp_path):
    a = jsonl(tmp_path / "a.jsonl", [chat(i) for i in range(4)])
    e = jsonl(tmp_path / "e.jsonl", [chat(i) for i in range(2)])
    train, evaluation = load(recipe_factory, train=[{"path": a}], eval=[{"path": e}], eval_fraction=0.5)
    assert (len(train), len(evaluation)) == (4, 2)


BAD_ROWS = {
    "empty conversation": ({"messages": []}, "row 3", "empty conversation"),
    "unknown role": ({"messages": [{"role": "robot", "content": "x"}]}, "row 3", "role"),
    "no assistant turn": ({"messages": [{"role": "user", "content": "x"}]}, "row 3", "no assistant"),
}


@pytest.mark.parametrize("case", BAD_ROWS, ids=list(BAD_ROWS))
def test_bad_row_is_named_by_number(recipe_factory, tmp_path, case):
    row, *needles = BAD_ROWS[case]
    path = jsonl(tmp_path / "bad.jsonl", [chat(0), chat(1), row, chat(3)])
    with pytest.raises(RecipeError) as err:
        load(recipe_factory, train=[{"path": path}])
    assert all(n in str(err.value) for n in (path, *needles)), err.value


def test_missing_columns_name_the_file_and_the_columns(recipe_factory, tmp_path):
    path = jsonl(tmp_path / "q.jsonl", [{"question": "x", "answer": "y"}])
    with pytest.raises(RecipeError, match=r"columns \['question', 'answer'\] match no format.*data.train.0.columns"):
        load(recipe_factory, train=[{"path": path}])


def test_column_mapping_to_a_missing_column(recipe_factory, tmp_path):
    path = jsonl(tmp_path / "q.jsonl", [chat(0)])
    with pytest.raises(RecipeError, match="maps 'messages' to 'convos'"):
        load(recipe_factory, train=[{"path": path, "columns": {"messages": "convos"}}])


def test_formats_that_cannot_mix(recipe_factory, tmp_path):
    a = jsonl(tmp_path / "a.jsonl", [chat(0)])
    t = jsonl(tmp_path / "t.jsonl", [{"text": "x"}])
    with pytest.raises(RecipeError, match="different formats"):
        load(recipe_factory, train=[{"path": a}, {"path": t}])


def test_unreadable_file(recipe_factory, tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"messages": [\n')
    with pytest.raises(RecipeError, match=r"broken.jsonl: line 1: not valid JSON"):
        load(recipe_factory, train=[{"path": str(path)}])
