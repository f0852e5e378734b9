"""Every rejection class: one line naming the file and key, exit code 2, no traceback, nothing started."""

from __future__ import annotations

import pytest

from launcher import recipe as recipes
from tests.helpers import REPO, assert_rejected, cli, fake_checkpoint, sentiment_recipe

CASES = {
    "unknown section, did you mean": ({"modle": {"name_or_path": "x"}}, ["modle", "did you mean 'model'"]),
    "unknown nested key": ({"lora": {"alpah": 8}}, ["lora.alpah", "did you mean 'alpha'"]),
    "unknown SFTConfig key": ({"training": {"learning_rat": 1e-4}}, ["training.learning_rat", "learning_rate"]),
    "wrong type": ({"training": {"per_device_train_batch_size": "eight"}},
                   ["training.per_device_train_batch_size", "must be int"]),
    "wrong type in section": ({"lora": {"dropout": "lots"}}, ["lora.dropout", "must be float"]),
    "zero LoRA rank": ({"lora": {"r": 0}}, ["lora.r", "must be > 0"]),
    "negative learning rate": ({"training": {"learning_rate": -1.0}}, ["training.learning_rate", "> 0"]),
    "eval fraction out of range": ({"data": {"train": [{"path": str(REPO / "recipes/smoke/data/train.jsonl")}],
                                             "eval_fraction": 1.5}}, ["data.eval_fraction", "[0, 1)"]),
    "missing model dir": ({"model": {"name_or_path": "./no/such/model", "init": "random"}},
                          ["model.name_or_path", "does not exist"]),
    "missing dataset file": ({"data": {"train": [{"path": "missing.jsonl"}]}}, ["data.train.0.path", "missing.jsonl"]),
    "missing ds config": ({"deepspeed": {"config": "ds_configs/zero9.json"}}, ["deepspeed.config", "zero9.json"]),
    "unknown ZeRO stage": ({"deepspeed": {"config": str(REPO / "ds_configs/zero3.json"),
                                          "overrides": {"zero_optimization": {"stage": 4}}}},
                           ["zero_optimization.stage", "0, 1, 2 and 3"]),
    "LoRA target that does not exist": ({"lora": {"target_modules": ["q_proj", "qkv_proj"]},
                                         "deepspeed": {"config": str(REPO / "ds_configs/zero2.json")}},
                                        ["lora.target_modules", "qkv_proj", "q_proj"]),
    "LoRA on a random base": ({"model": {"init": "random"}, "lora": {"r": 4}}, ["model.init", "LoRA"]),
    "evaluation without eval data": ({"data": {"train": [{"path": str(REPO / "recipes/smoke/data/train.jsonl")}],
                                               "eval": [], "eval_fraction": 0.0}}, ["training.eval_strategy", "eval"]),
    "QLoRA with ZeRO-3": ({"lora": {"quantize": "4bit"}}, ["lora.quantize", "ZeRO-3"]),
    "LoRA with ZeRO-3 that cannot save adapters": ({"lora": {"r": 8}},
                                                   ["stage3_gather_16bit_weights_on_model_save"]),
    "batch that cannot divide": ({"run": {"name": "x", "global_batch_size": 30}},
                                 ["run.global_batch_size", "not divisible"]),
    "accumulation contradicts global batch": ({"training": {"gradient_accumulation_steps": 3}},
                                              ["gradient_accumulation_steps", "global_batch_size"]),
    "launcher-owned key": ({"training": {"output_dir": "/tmp/x"}}, ["training.output_dir", "run.output_dir"]),
    "missing required key": ({"drop": ("run.name",)}, ["run.name", "required"]),
    "bf16 and fp16": ({"training": {"bf16": True, "fp16": True}}, ["training.bf16", "fp16"]),
    "nothing saved": ({"training": {"save_strategy": "no"}}, ["training.save_strategy", "is no", "steps"]),
    "last step unsaved": ({"training": {"save_strategy": "best", "metric_for_best_model": "eval_loss"}},
                          ["training.save_strategy", "is best", "last step is not saved"]),
    "best model at end ignored": ({"training": {"load_best_model_at_end": True}},
                                  ["training.load_best_model_at_end", "newest complete checkpoint",
                                   "launcher consolidate"]),
    "full eval in a precision training is not in": ({"training": {"bf16_full_eval": True}},
                                                    ["training.bf16_full_eval", "training.bf16: true"]),
    "half-precision weights trained in fp32": ({"model": {"dtype": "bfloat16"}},
                                               ["model.dtype", "ZeRO-3 would train in float32", "training.bf16"]),
    "flash-attention in fp32": ({"model": {"attn_implementation": "flash_attention_2"}},
                                ["model.attn_implementation", "bf16 or fp16 only", "sdpa"]),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_bad_recipe_is_rejected_by_plan(recipe_factory, case):
    sections, needles = CASES[case]
    path = recipe_factory(**sections)
    assert_rejected(cli("plan", path, "--nproc_per_node", 2), str(path) if "ZeRO stage" not in case else "", *needles)


def test_yaml_syntax_error_names_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("run:\n  name: x\nmodel: [unclosed\n")
    assert_rejected(cli("plan", path), str(path), "line", "YAML syntax error")


def test_empty_recipe(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert_rejected(cli("plan", path), str(path), "empty")


def test_ds_config_that_is_not_json(recipe_factory, tmp_path):
    bad = tmp_path / "zero.json"
    bad.write_text('{"zero_optimization": {"stage": 3,}}')
    assert_rejected(cli("plan", recipe_factory(deepspeed={"config": str(bad)})), str(bad), "not valid JSON", "line 1")


def test_override_typo_names_the_command_line(recipe_factory):
    result = cli("plan", recipe_factory(), "--training.learnin_rate=1e-4")
    assert_rejected(result, "--training.learnin_rate", "learning_rate")


def test_unknown_flag(recipe_factory):
    assert_rejected(cli("plan", recipe_factory(), "--nproc-per-nod", 2), "unknown option")


def test_bad_topology_flag(recipe_factory):
    assert_rejected(cli("plan", recipe_factory(), "--nproc_per_node", 0), "--nproc_per_node", ">= 1")
    assert_rejected(cli("plan", recipe_factory(), "--nnodes", 2, "--node_rank", 2), "--node_rank")


def test_rejected_launch_starts_nothing_and_writes_nothing(recipe_factory, tmp_path):
    path = recipe_factory(training={"learning_rat": 1.0})
    assert_rejected(cli("launch", path, "--nproc_per_node", 2), "learning_rat")
    assert not (tmp_path / "run").exists()


def test_resume_never_refuses_a_run_directory_holding_checkpoints(recipe_factory, tmp_path):
    fake_checkpoint(tmp_path / "run", 5)
    (tmp_path / "run" / "recipe.yaml").write_text("earlier run\n")
    assert_rejected(cli("launch", recipe_factory(), "--nproc_per_node", 2, "--resume", "never"),
                    "already holds checkpoints", "--run.resume=auto")
    assert (tmp_path / "run" / "recipe.yaml").read_text() == "earlier run\n"


def test_resume_refuses_a_recipe_changed_since_the_run_started(recipe_factory, tmp_path):
    recipe = recipe_factory()
    stored = tmp_path / "run" / "recipe.yaml"
    fake_checkpoint(tmp_path / "run", 75)
    stored.write_text(recipes.dump(recipes.load(str(recipe))))
    before = stored.read_text()
    assert_rejected(cli("launch", recipe, "--nproc_per_node", 2, "--training.learning_rate=1e-4"),
                    str(stored), "training.learning_rate changed", "new run.name")
    assert stored.read_text() == before


@pytest.mark.parametrize("target", ["missing", "not_a_checkpoint"])
def test_resume_path_must_be_a_complete_checkpoint(recipe_factory, tmp_path, target):
    (tmp_path / "not_a_checkpoint").mkdir()
    assert_rejected(cli("launch", recipe_factory(), "--nproc_per_node", 2, "--resume", tmp_path / target),
                    "run.resume" if target == "missing" else "not a complete checkpoint", target)


def test_a_finished_run_is_not_trained_again(recipe_factory, tmp_path):
    fake_checkpoint(tmp_path / "run", 150)
    result = cli("launch", recipe_factory(training={"max_steps": 150}), "--nproc_per_node", 2)
    assert result.returncode == 0, result.stderr
    assert "already trained to the end (checkpoint-150); nothing to do" in result.stdout
    assert not (tmp_path / "run" / "recipe.yaml").exists()  # nothing started, nothing written


def test_online_wandb_without_a_key_is_refused_before_launch(recipe_factory, tmp_path):
    recipe = recipe_factory(wandb={"project": "p", "mode": "online"})
    env = {"HOME": str(tmp_path), "WANDB_API_KEY": "", "WANDB_MODE": ""}
    assert_rejected(cli("launch", recipe, "--nproc_per_node", 2, env=env), str(recipe), "wandb.mode is online",
                    "WANDB_API_KEY")
    assert not (tmp_path / "run").exists()


def test_wandb_offline_alone_needs_no_project(recipe_factory):
    """`--wandb.mode=offline` on its own is a complete W&B section: the project has a default (tracking.start)."""
    result = cli("plan", recipe_factory(), "--wandb.mode=offline")
    assert result.returncode == 0, result.stderr
    assert "mode: offline" in result.stdout


@pytest.mark.parametrize(("sections", "said"), [
    ({"data": {"eval": [], "eval_fraction": 0.0}, "training": {"eval_strategy": "no"}}, "needs eval rows"),
    ({"run": {"name": "smoke", "consolidate": False}}, "needs run.consolidate: true"),
])
def test_scoring_answers_needs_eval_rows_and_a_consolidated_model(recipe_factory, sections, said):
    recipe = recipe_factory(**sections)
    assert_rejected(cli("plan", recipe, "--run.score_answers=50"), "run.score_answers", said)


@pytest.mark.parametrize(("sections", "said"), [
    ({"data": {"eval": [], "eval_fraction": 0.0}, "training": {"eval_strategy": "no"}}, "needs eval rows"),
    ({"training": {"eval_strategy": "no"}}, "never evaluates"),
])
def test_answers_during_training_need_eval_rows_and_evaluations(recipe_factory, sections, said):
    assert_rejected(cli("plan", recipe_factory(**sections), "--run.eval_answers=50"), "run.eval_answers", said)


def test_answers_are_not_scored_for_a_classifier(tmp_path):
    for key in ("eval_answers", "score_answers"):
        assert_rejected(cli("plan", sentiment_recipe(tmp_path), f"--run.{key}=50"), f"run.{key}", "predicts labels")


def test_report_to_wandb_is_left_to_the_wandb_section(recipe_factory):
    assert_rejected(cli("plan", recipe_factory(training={"report_to": ["wandb"]})), "training.report_to",
                    "wandb section")


def test_plan_runs_every_cross_field_rule_even_the_cluster_ones(recipe_factory):
    """A bad sbatch option was caught only at submit; every rule lives in one place now, and plan runs it."""
    assert_rejected(cli("plan", recipe_factory(slurm={"sbatch": ["mem=0"]})), "slurm.sbatch", "'mem=0'",
                    "one sbatch option")


@pytest.mark.parametrize(("time", "grace", "refused"), [("00:02:00", 300, True), ("5", 300, True),
                                                         ("00:10:00", 300, False), ("1-00", 300, False),
                                                         ("00:02:00", 0, False)])
def test_a_signal_grace_that_does_not_fit_the_time_limit_is_refused(recipe_factory, time, grace, refused):
    """USR1 grace seconds before the limit: a grace as long as the limit stops and requeues every job at once."""
    result = cli("submit", recipe_factory(slurm={"signal_grace": grace}), "--gpus_per_node", 1, "--time", time,
                 "--dry_run")
    if refused:
        assert_rejected(result, "slurm.signal_grace", f"is {grace} s", f"slurm.time {time}")
    else:
        assert result.returncode == 0, result.stderr
        assert ("#SBATCH --signal=B:USR1@300" in result.stdout) == bool(grace)
