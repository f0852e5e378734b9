"""Bad input gets a clear answer, and nothing is lost: a corpus of broken recipes, data, tokenizers and run
directories, each given to the real `launcher launch`. Every one must end with exit code 2 and exactly one line on
stderr naming the file and the key or row and what to do; no traceback, nothing on stdout, no run directory, no
process started, nothing in the test's directory written or changed. Data and tokenizer problems are found by the
pre-flight check (launcher/preflight.py) before any rank starts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from launcher import modeling, preflight
from launcher import recipe as recipes
from tests.helpers import REPO, assert_rejected, cli, fake_checkpoint, shipped_recipe, smoke_recipe

SMOKE_DATA = REPO / "recipes" / "smoke" / "data" / "train.jsonl"
SMOKE_MODEL = REPO / "recipes" / "smoke" / "model"
SMOKE_TEMPLATE = (SMOKE_MODEL / "chat_template.jinja").read_text()
ZERO2 = str(REPO / "ds_configs" / "zero2.json")

# Loaded into every process the CLI starts (sitecustomize on PYTHONPATH): writes what each process it starts runs.
SPY = """
import os, subprocess
_start = subprocess.Popen.__init__
def _logged(self, args, *rest, **kwargs):
    with open(os.environ["LAUNCHER_TEST_SPAWNED"], "a") as log:
        log.write(repr(args) + "\\n")
    _start(self, args, *rest, **kwargs)
subprocess.Popen.__init__ = _logged
"""


@pytest.fixture(scope="module")
def spy(tmp_path_factory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("spy")
    (folder / "sitecustomize.py").write_text(SPY)
    pythonpath = os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH")) if p)
    return folder / "spawned.log", {"PYTHONPATH": pythonpath, "LAUNCHER_TEST_SPAWNED": str(folder / "spawned.log")}


def tree(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


@pytest.fixture
def refused(tmp_path, spy):
    """refused(recipe, *needles, flags=()): `launch` it on 2 ranks (or `submit` it: command="submit") and check it
    was turned down with nothing done."""
    log, env = spy

    def launch(recipe: Path, *needles: str, flags: tuple = (), command: str = "launch") -> str:
        log.unlink(missing_ok=True)
        before = tree(tmp_path)
        ranks = ("--nproc_per_node", 2) if command == "launch" else ("--gpus_per_node", 2)
        result = cli(command, recipe, *ranks, *flags, env=env)
        assert_rejected(result, *needles)
        assert tree(tmp_path) == before, "a refused launch wrote or changed files"
        assert not log.exists(), f"a refused launch started processes: {log.read_text()}"
        return result.stderr

    return launch


def test_the_spy_sees_the_processes_a_cli_process_starts(spy):
    log, env = spy
    log.unlink(missing_ok=True)
    subprocess.run([sys.executable, "-c", "import subprocess; subprocess.run(['true'])"], env={**os.environ, **env},
                   check=True)
    assert "'true'" in log.read_text()


# --- the recipe file itself -------------------------------------------------------------------------------------

RECIPE_FILES = {
    "YAML syntax error": (b"run:\n  name: x\nmodel: [unclosed\n", ["YAML syntax error", "line"]),
    "empty file": (b"", ["empty"]),
    "only a comment": (b"# launcher launch this.yaml\n", ["empty"]),
    "a list, not sections": (b"- run\n- model\n", ["mapping of sections"]),
    "tab-indented YAML": (b"run:\n\tname: x\n", ["YAML syntax error", "line 2"]),
    "bytes that are not UTF-8": (b"run:\n  name: caf\xe9\n", ["not UTF-8", "byte"]),
}


@pytest.mark.parametrize("case", RECIPE_FILES, ids=list(RECIPE_FILES))
def test_broken_recipe_file(tmp_path, refused, case):
    content, needles = RECIPE_FILES[case]
    path = tmp_path / "recipe.yaml"
    path.write_bytes(content)
    refused(path, str(path), *needles)


def test_missing_recipe_file(tmp_path, refused):
    refused(tmp_path / "nowhere.yaml", str(tmp_path / "nowhere.yaml"), "not found")


# --- recipe keys: unknown, wrongly typed, out of range, naming missing files --------------------------------------

DATASET = {"path": str(SMOKE_DATA)}

RECIPE_KEYS = {
    # an unknown key at every level (deepspeed.overrides and data.*.columns are free-form)
    "unknown top-level key": ({"trainig": {"max_steps": 5}}, ["trainig", "did you mean 'training'"]),
    "unknown run key": ({"run": {"nmae": "x"}}, ["run.nmae", "did you mean 'name'"]),
    "unknown model key": ({"model": {"tokeniser": "x"}}, ["model.tokeniser", "did you mean 'tokenizer'"]),
    "unknown data key": ({"data": {"train": [DATASET], "eval_fracton": 0.1}},
                         ["data.eval_fracton", "did you mean 'eval_fraction'"]),
    "unknown key in a training dataset": ({"data": {"train": [{**DATASET, "wieght": 2}]}},
                                          ["data.train.0.wieght", "did you mean 'weight'"]),
    "unknown key in an eval dataset": ({"data": {"train": [DATASET], "eval": [{**DATASET, "splt": "test"}]}},
                                       ["data.eval.0.splt", "did you mean 'split'"]),
    "unknown training key": ({"training": {"learnig_rate": 1e-3}}, ["training.learnig_rate", "learning_rate"]),
    "unknown deepspeed key": ({"deepspeed": {"config": ZERO2, "overides": {}}},
                              ["deepspeed.overides", "did you mean 'overrides'"]),
    "unknown lora key": ({"lora": {"alfa": 8}}, ["lora.alfa", "did you mean 'alpha'"]),
    "unknown slurm key": ({"slurm": {"partion": "gpu"}}, ["slurm.partion", "did you mean 'partition'"]),
    "unknown wandb key": ({"wandb": {"projct": "p"}}, ["wandb.projct", "did you mean 'project'"]),
    # wrong types
    "section that is not a mapping": ({"model": "recipes/smoke/model"}, ["model", "mapping"]),
    "name that is a list": ({"run": {"name": ["a", "b"]}}, ["run.name", "must be str"]),
    "batch size that is a word": ({"run": {"name": "x", "global_batch_size": "many"}},
                                  ["run.global_batch_size", "must be int"]),
    "dtype not in the list": ({"model": {"dtype": "fp33"}}, ["model.dtype", "float32"]),
    "boolean that is a word": ({"model": {"trust_remote_code": "yes"}}, ["model.trust_remote_code", "must be bool"]),
    "datasets that are not a list": ({"data": {"train": DATASET}}, ["data.train", "must be a list"]),
    "dataset weight that is a word": ({"data": {"train": [{**DATASET, "weight": "heavy"}]}},
                                      ["data.train.0.weight", "must be float"]),
    "columns that are not a mapping": ({"data": {"train": [{**DATASET, "columns": ["messages"]}]}},
                                       ["data.train.0.columns", "mapping"]),
    "SFTConfig integer that is a word": ({"training": {"max_steps": "ten"}}, ["training.max_steps", "int"]),
    "LoRA rank that is fractional": ({"lora": {"r": 1.5}}, ["lora.r", "must be int"]),
    "overrides that are not a mapping": ({"deepspeed": {"config": ZERO2, "overrides": "stage 2"}},
                                         ["deepspeed.overrides", "mapping"]),
    # zero and negative sizes
    "zero global batch": ({"run": {"name": "x", "global_batch_size": 0}}, ["run.global_batch_size", "> 0"]),
    "zero micro batch": ({"training": {"per_device_train_batch_size": 0}},
                         ["training.per_device_train_batch_size", "> 0"]),
    "zero steps": ({"training": {"max_steps": 0}}, ["training.max_steps", "-1"]),
    "negative max length": ({"training": {"max_length": -64}}, ["training.max_length", "> 0"]),
    "zero learning rate": ({"training": {"learning_rate": 0}}, ["training.learning_rate", "> 0"]),
    "negative dataset weight": ({"data": {"train": [{**DATASET, "weight": -1}]}}, ["data.train.0.weight", "> 0"]),
    "zero dataset weight": ({"data": {"train": [{**DATASET, "weight": 0}]}}, ["data.train.0.weight", "> 0"]),
    "negative LoRA rank": ({"lora": {"r": -4}}, ["lora.r", "> 0"]),
    "zero nodes": ({"slurm": {"nodes": 0}}, ["slurm.nodes", "> 0"]),
    "negative eval fraction": ({"data": {"train": [DATASET], "eval_fraction": -0.1}},
                               ["data.eval_fraction", "[0, 1)"]),
    # files the recipe names
    "missing dataset file": ({"data": {"train": [{"path": "missing.jsonl"}]}},
                             ["data.train.0.path", "missing.jsonl", "does not exist"]),
    "dataset of an unsupported type": ({"data": {"train": [{"path": str(REPO / "README.md")}]}},
                                       ["data.train.0.path", "README.md", ".jsonl"]),
    "missing model directory": ({"model": {"name_or_path": "./no/such/model"}}, ["model.name_or_path", "no/such"]),
    "missing ZeRO config": ({"deepspeed": {"config": "ds_configs/zero9.json"}}, ["deepspeed.config", "zero9.json"]),
    "LoRA targets that do not exist": ({"lora": {"target_modules": ["q_proj", "qkv_proj"]},
                                        "deepspeed": {"config": ZERO2}},
                                       ["lora.target_modules", "qkv_proj", "q_proj"]),
}


@pytest.mark.parametrize("case", RECIPE_KEYS, ids=list(RECIPE_KEYS))
def test_bad_recipe_key(recipe_factory, refused, case):
    sections, needles = RECIPE_KEYS[case]
    recipe = recipe_factory(**sections)
    refused(recipe, str(recipe), *needles)


def test_zero_config_that_is_not_json(recipe_factory, tmp_path, refused):
    config = tmp_path / "zero.json"
    config.write_text('{"zero_optimization": {"stage": 2,}}\n')
    refused(recipe_factory(deepspeed={"config": str(config)}), str(config), "not valid JSON", "line 1")


def test_model_config_that_is_not_json(recipe_factory, tmp_path, refused):
    config = tmp_path / "config.json"
    config.write_text("{'model_type': 'llama'}")
    refused(recipe_factory(model={"config": str(config)}), str(config), "not valid JSON", "model config")


# --- the command line ---------------------------------------------------------------------------------------------

COMMAND_LINES = {
    "misspelt override": (["--training.learnin_rate=1e-4"], ["--training.learnin_rate", "learning_rate"]),
    "override of a list item that is not there": (["--data.train.3.path=x.jsonl"], ["--data.train.3", "not an index"]),
    "override of the wrong type": (["--training.max_steps=ten"], ["training.max_steps", "--training.max_steps"]),
    "misspelt flag": (["--nproc-per-nod", "4"], ["--nproc_per_nod", "unknown option"]),
}


@pytest.mark.parametrize("case", COMMAND_LINES, ids=list(COMMAND_LINES))
def test_bad_command_line(recipe_factory, refused, case):
    flags, needles = COMMAND_LINES[case]
    refused(recipe_factory(), *needles, flags=tuple(flags))


# --- data files: read by pre-flight exactly as the ranks would read them -----------------------------------------


def chat(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}


def pair(i: int) -> dict:
    return {"prompt": f"p{i}", "completion": f"c{i}"}


def jsonl(rows: list) -> bytes:
    """One line per row: dicts as JSON, bytes and str as they are."""
    lines = [r if isinstance(r, bytes) else (r if isinstance(r, str) else json.dumps(r)).encode() for r in rows]
    return b"".join(line + b"\n" for line in lines)


def third_row_is(bad, good=chat) -> bytes:
    return jsonl([good(1), good(2), bad, good(4)])


DATA_FILES = {
    "a row missing a column": ("data.jsonl", third_row_is({"prompt": "p3"}, good=pair), ["row 3", "'completion'"]),
    "a row without the messages column": ("data.jsonl", third_row_is({"text": "t3"}), ["row 3", "'messages'"]),
    "an empty conversation": ("data.jsonl", third_row_is({"messages": []}), ["row 3", "empty conversation"]),
    "an unknown role": ("data.jsonl", third_row_is({"messages": [{"role": "robot", "content": "x"}]}),
                        ["row 3", "'robot'"]),
    "a message without content": ("data.jsonl", third_row_is({"messages": [{"role": "user"},
                                                                           {"role": "assistant", "content": "a"}]}),
                                  ["row 3", "content"]),
    "a conversation without an assistant turn": ("data.jsonl", third_row_is({"messages": [chat(3)["messages"][0]]}),
                                                 ["row 3", "no assistant"]),
    "messages that are a string": ("data.jsonl", third_row_is({"messages": "hello"}), ["row 3", "list"]),
    "an empty text": ("data.jsonl", third_row_is({"text": ""}, good=lambda i: {"text": f"t{i}"}), ["row 3", "'text'"]),
    "bytes that are not UTF-8": ("data.jsonl", third_row_is(b'{"messages": [{"role": "user", "content": "caf\xe9"}, '
                                                            b'{"role": "assistant", "content": "a"}]}'),
                                 ["line 3", "byte", "not UTF-8", "re-encode"]),
    "a line that is not JSON": ("data.jsonl", third_row_is('{"messages": [{"role": "user"'),
                                ["line 3", "not valid JSON"]),
    "a line that is not a JSON object": ("data.jsonl", third_row_is("[1, 2]"), ["line 3", "JSON object"]),
    "an empty file": ("data.jsonl", b"", ["empty"]),
    "only blank lines": ("data.jsonl", b"\n\n\n", ["no rows"]),
    "columns of no known format": ("data.jsonl", jsonl([{"question": "q", "answer": "a"}] * 3),
                                   ["question", "data.train.0.columns"]),
    "a CSV that is not UTF-8": ("data.csv", b"text\nhello\ncaf\xe9\n", ["line 3", "not UTF-8"]),
    "a CSV with an empty cell": ("data.csv", b"prompt,completion\np1,c1\np2,\n", ["row 2", "'completion'"]),
    "a Parquet file that is not Parquet": ("data.parquet", b"PAR1 but not really", ["data.train.0", "could not"]),
}


@pytest.mark.parametrize("case", DATA_FILES, ids=list(DATA_FILES))
def test_broken_data_file(recipe_factory, tmp_path, refused, case):
    name, content, needles = DATA_FILES[case]
    data = tmp_path / name
    data.write_bytes(content)
    refused(recipe_factory(data={"train": [{"path": str(data)}]}), str(data), *needles)


def test_submit_checks_the_data_before_queueing_a_job(recipe_factory, tmp_path, refused):
    bad = tmp_path / "data.jsonl"
    bad.write_bytes(third_row_is({"messages": []}))
    refused(recipe_factory(data={"train": [{"path": str(bad)}]}), str(bad), "row 3", command="submit")


def test_bad_row_in_the_second_training_set(recipe_factory, tmp_path, refused):
    bad = tmp_path / "second.jsonl"
    bad.write_bytes(third_row_is({"messages": []}))
    refused(recipe_factory(data={"train": [DATASET, {"path": str(bad)}]}), str(bad), "row 3")


def test_bad_row_in_the_eval_set(recipe_factory, tmp_path, refused):
    bad = tmp_path / "eval.jsonl"
    bad.write_bytes(third_row_is({"messages": [{"role": "robot", "content": "x"}]}))
    refused(recipe_factory(data={"train": [DATASET], "eval": [{"path": str(bad)}]}), str(bad), "row 3", "role")


def test_question_too_long_for_its_window(tmp_path, refused):
    """A question that leaves a window no more context than head.stride cannot be windowed: the tokenizer would
    panic in every rank. The shipped QA recipe's windows are 48 tokens with a stride of 12."""
    rows = [json.loads(line) for line in (REPO / "recipes/qa/data/eval.jsonl").read_text().splitlines()[:3]]
    rows[1]["question"] = " ".join(["who"] * 40) + "?"
    bad = tmp_path / "long.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = shipped_recipe(REPO / "recipes" / "qa.yaml", tmp_path, data={"eval": [{"path": str(bad)}]})
    refused(recipe, f"{bad}: row 2: the question is", "leaves 0 of the 48-token window", "head.stride (12)")


def test_column_mapping_to_a_missing_column(recipe_factory, refused):
    recipe = recipe_factory(data={"train": [{**DATASET, "columns": {"messages": "conversations"}}]})
    refused(recipe, str(recipe), "data.train.0.columns", "conversations")


def test_datasets_of_different_formats(recipe_factory, tmp_path, refused):
    text = tmp_path / "text.jsonl"
    text.write_bytes(jsonl([{"text": "t"}] * 3))
    recipe = recipe_factory(data={"train": [DATASET, {"path": str(text)}]})
    refused(recipe, str(recipe), "data.train.0", "data.train.1", "different formats")


def test_datasets_whose_rows_are_built_differently(recipe_factory, tmp_path, refused):
    named = tmp_path / "named.jsonl"
    named.write_bytes(jsonl([{"messages": [{"role": "user", "content": "q", "name": "ann"},
                                           {"role": "assistant", "content": "a"}]}] * 3))
    recipe = recipe_factory(data={"train": [DATASET, {"path": str(named)}]})
    refused(recipe, str(recipe), "data.train.0", "data.train.1", "cannot be mixed")


# --- the tokenizer against the data -------------------------------------------------------------------------------


def tokenizer_dir(tmp_path: Path, template: str | None) -> Path:
    """The smoke tokenizer, with this chat template or none."""
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(SMOKE_MODEL / name, folder / name)
    if template is not None:
        (folder / "chat_template.jinja").write_text(template)
    return folder


def test_chat_data_with_a_tokenizer_without_a_chat_template(recipe_factory, tmp_path, refused):
    tokenizer = tokenizer_dir(tmp_path, None)
    refused(recipe_factory(model={"tokenizer": str(tokenizer)}), str(tokenizer), str(SMOKE_DATA), "no chat template",
            "training.chat_template_path")


def test_assistant_only_loss_with_a_template_without_generation_markers(recipe_factory, tmp_path, refused):
    template = SMOKE_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    assert template != SMOKE_TEMPLATE
    tokenizer = tokenizer_dir(tmp_path, template)
    refused(recipe_factory(model={"tokenizer": str(tokenizer)}), str(tokenizer), "{% generation %}",
            "training.assistant_only_loss")


def test_assistant_only_loss_without_chat_data(recipe_factory, tmp_path, refused):
    data = tmp_path / "pairs.jsonl"
    data.write_bytes(jsonl([pair(i) for i in range(4)]))
    refused(recipe_factory(data={"train": [{"path": str(data)}]}), str(data), "training.assistant_only_loss: false")


def test_chat_template_that_cannot_render_the_data(recipe_factory, tmp_path, refused):
    refusing = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role here') }}{% endif %}"
    tokenizer = tokenizer_dir(tmp_path, refusing + SMOKE_TEMPLATE)
    data = tmp_path / "system.jsonl"
    data.write_bytes(jsonl([{"messages": [{"role": "system", "content": "s"}, *chat(i)["messages"]]}
                            for i in range(4)]))
    recipe = recipe_factory(model={"tokenizer": str(tokenizer)}, data={"train": [{"path": str(data)}]})
    refused(recipe, str(data), "row 1", "no system role here", "chat template")


def test_tokenizer_that_cannot_be_loaded(recipe_factory, tmp_path, refused):
    tokenizer = tokenizer_dir(tmp_path, SMOKE_TEMPLATE)
    (tokenizer / "tokenizer.json").write_text('{"version": "1.0", "model": {')  # a download cut short
    refused(recipe_factory(model={"tokenizer": str(tokenizer)}), str(tokenizer), "model.tokenizer", "could not")


# --- run directories and checkpoints ------------------------------------------------------------------------------


def test_resume_never_on_a_run_directory_holding_another_run(recipe_factory, tmp_path, refused):
    fake_checkpoint(tmp_path / "run", 75)
    (tmp_path / "run" / "recipe.yaml").write_text("the earlier run's recipe\n")
    refused(recipe_factory(), str(tmp_path / "run"), "already holds checkpoints", "--run.resume=auto",
            flags=("--resume", "never"))


def test_resume_under_a_changed_recipe(recipe_factory, tmp_path, refused):
    recipe = recipe_factory()
    fake_checkpoint(tmp_path / "run", 75)
    (tmp_path / "run" / "recipe.yaml").write_text(recipes.dump(recipes.load(str(recipe))))
    refused(recipe, str(tmp_path / "run" / "recipe.yaml"), "training.lr_scheduler_type changed", "run.name",
            flags=("--training.lr_scheduler_type=linear",))  # a longer max_steps continues: test_resume_rules


def test_resume_from_a_directory_that_is_not_a_checkpoint(recipe_factory, tmp_path, refused):
    (tmp_path / "elsewhere").mkdir()
    refused(recipe_factory(), str(tmp_path / "elsewhere"), "not a complete checkpoint",
            flags=("--resume", tmp_path / "elsewhere"))


def test_resume_from_a_path_that_does_not_exist(recipe_factory, tmp_path, refused):
    refused(recipe_factory(), "run.resume", str(tmp_path / "gone"), flags=("--resume", tmp_path / "gone"))


def test_resume_with_another_global_batch(recipe_factory, tmp_path, refused):
    """Another number of ranks is fine (launcher/universal.py); another global batch is another experiment."""
    checkpoint = fake_checkpoint(tmp_path / "run", 75, world=4)
    marker = json.loads((checkpoint / "complete.json").read_text())
    (checkpoint / "complete.json").write_text(json.dumps({**marker, "global_batch": 64}))
    refused(recipe_factory(), "checkpoint-75", "global batch 64 (4 ranks)")


# --- what pre-flight lets through: no false alarms ---------------------------------------------------------------


def test_preflight_passes_the_smoke_recipe_quietly(capfd):
    where = str(REPO / "recipes" / "smoke.yaml")
    preflight.check(recipes.load(where), where)
    assert capfd.readouterr() == ("", "")  # launch prints its own lines; pre-flight adds none


def test_preflight_leaves_what_is_on_the_hub_to_the_ranks(tmp_path):
    """No network here: a hub dataset, or a hub tokenizer that is not in the local cache, is the ranks' to fetch."""
    recipe = smoke_recipe(tmp_path, data={"train": [DATASET, {"path": "some-org/some-dataset"}]},
                          model={"tokenizer": "some-org/some-tokenizer"})
    preflight.check(recipes.load(str(recipe)), str(recipe))


def test_preflight_takes_the_template_from_chat_template_path(tmp_path):
    tokenizer = tokenizer_dir(tmp_path, None)
    template = tmp_path / "chat.jinja"
    template.write_text(SMOKE_TEMPLATE)
    recipe = smoke_recipe(tmp_path, model={"tokenizer": str(tokenizer)},
                          training={"chat_template_path": str(template)})
    preflight.check(recipes.load(str(recipe)), str(recipe))


def test_preflight_needs_no_template_for_plain_text(tmp_path):
    data = tmp_path / "text.jsonl"
    data.write_bytes(jsonl([{"text": f"t{i}"} for i in range(4)]))
    recipe = smoke_recipe(tmp_path, model={"tokenizer": str(tokenizer_dir(tmp_path, None))},
                          data={"train": [{"path": str(data)}], "eval": [{"path": str(data)}]},
                          training={"assistant_only_loss": False})
    preflight.check(recipes.load(str(recipe)), str(recipe))


def test_quick_tokenizer_is_the_one_the_ranks_load():
    """Pre-flight skips AutoTokenizer (torch and model configs, seconds) for generic tokenizers: same result."""
    recipe = recipes.load(str(REPO / "recipes" / "smoke.yaml"))
    quick, full = modeling.load_tokenizer(recipe, quick=True), modeling.load_tokenizer(recipe)
    assert type(quick) is type(full)
    assert quick.chat_template == full.chat_template and quick.pad_token == full.pad_token
    chat_ids = [t.apply_chat_template(chat(1)["messages"], return_dict=True, return_assistant_tokens_mask=True)
                for t in (quick, full)]
    assert chat_ids[0] == chat_ids[1] and 1 in chat_ids[0]["assistant_masks"]
