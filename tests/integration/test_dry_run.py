"""`launcher train RECIPE --dry_run --tiny` on CPU: every shipped recipe passes, broken recipes fail at the stage
that is wrong, with one clear line. The real-model recipes read the shipped UltraChat-schema sample instead of the
hub dataset (offline), and get the stand-in Llama 3.1 tokenizer."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.helpers import REPO, cli, on_import, smoke_recipe

pytestmark = pytest.mark.integration

STAGES = ("recipe valid", "tiny model", "dataset", "tokens/example", "loss tokens", "LoRA targets", "train",
          "memory", "checkpoint", "consolidate", "reload", "generate")
GATHER = {"overrides": {"zero_optimization": {"stage3_gather_16bit_weights_on_model_save": True}}}


def dry_run(recipe: Path, tmp_path: Path, *flags: str, tiny: bool = True):
    return cli("train", recipe, "--dry_run", *(["--tiny"] if tiny else []), f"--run.output_dir={tmp_path / 'run'}",
               *flags)


def assert_passed(result, tmp_path: Path, tiny: bool = True) -> str:
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report = result.stdout[result.stdout.index("--- dry run report"):]
    for stage in STAGES if tiny else [s for s in STAGES if s != "tiny model"]:
        assert f"PASS  {stage}" in report, f"stage {stage} missing:\n{report}"
    assert "FAIL" not in report
    assert not (tmp_path / "run").exists()  # the throwaway directory is beside the real run, never the real run
    return report


def assert_failed_at(result, stage: str, *words: str) -> None:
    assert result.returncode != 0, result.stdout[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: dry run failed at stage '{stage}': "), result.stderr[-3000:]
    for word in words:
        assert word in last, last
    assert f"FAIL  {stage}" in result.stdout


@pytest.mark.parametrize("tiny", [True, False], ids=["tiny", "real-weights"])
def test_smoke_recipe_passes(tmp_path, tiny):
    report = assert_passed(dry_run(REPO / "recipes" / "smoke.yaml", tmp_path, tiny=tiny), tmp_path, tiny)
    assert "<|assistant|>«" in report  # the answer after the assistant tag carries the loss
    assert "0% truncated" in report and "STAND-IN" not in report and ("PASS  tiny model" in report) == tiny


# An attention path that ignores where position_ids restart (transformers' packed-sequence detection switched off in
# every process of the dry run): the packed sequences then see each other. Test-only.
MIXING = on_import("transformers.masking_utils", "module.find_packed_sequence_indices = lambda position_ids: None")


@pytest.mark.parametrize("mixing", [False, True], ids=["packed", "packed-and-mixing"])
def test_packing_is_checked_on_the_built_model(tmp_path, mixing):
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(MIXING if mixing else "")
    result = cli("train", REPO / "recipes" / "smoke.yaml", "--dry_run", "--training.packing=true",
                 f"--run.output_dir={tmp_path / 'run'}", env={"PYTHONPATH": str(tmp_path / "hook")})
    if mixing:
        assert_failed_at(result, "packing", "packed but", "lets packed sequences see each other",
                         "training.packing: false")
        assert result.returncode == 2 and "PASS  train" not in result.stdout  # caught before any training step
    else:
        assert "PASS  packing         3 sequences" in assert_passed(result, tmp_path, tiny=False)


HEAD_STAGES = ("recipe valid", "dataset", "tokens/example", "labels", "trainable", "train", "memory", "checkpoint",
               "consolidate", "reload", "predict")


def test_classification_recipe_passes(tmp_path):
    from tests.helpers import sentiment_recipe

    result = dry_run(sentiment_recipe(tmp_path), tmp_path, tiny=False)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report = result.stdout[result.stdout.index("--- dry run report"):]
    for stage in HEAD_STAGES:
        assert f"PASS  {stage}" in report, f"stage {stage} missing:\n{report}"
    assert "labels ['negative', 'positive']" in report and "24.3%)" in report  # embeddings + 3 of 4 layers frozen


def test_regression_head_passes(tmp_path):
    import json

    from tests.helpers import sentiment_recipe

    rows = [json.loads(line) for line in (REPO / "recipes/sentiment/data/train.jsonl").read_text().splitlines()]
    scores = tmp_path / "scores.jsonl"  # the same reviews, scored 0.0 (negative) or 1.0 (positive)
    scores.write_text("".join(json.dumps({"text": r["text"], "label": float(r["label"] == "positive")}) + "\n"
                              for r in rows[:200]))
    recipe = sentiment_recipe(tmp_path, task="regression", head={"labels": []},
                              data={"train": [{"path": str(scores)}], "eval": [{"path": str(scores)}]})
    result = dry_run(recipe, tmp_path, tiny=False)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "PASS  labels          regression targets from 0 to 1" in result.stdout
    assert "PASS  predict" in result.stdout and "FAIL" not in result.stdout


def test_tiny_goes_with_dry_run():
    result = cli("train", REPO / "recipes" / "smoke.yaml", "--tiny")
    assert result.returncode != 0 and "--tiny, --nproc_per_node and --nnodes go with --dry_run" in result.stderr


@pytest.mark.parametrize("recipe", ["llama-3.1-8b/full.yaml", "llama-3.1-8b/lora.yaml",
                                    "llama-3.1-70b/lora.yaml"])
def test_real_model_recipe_passes_offline(tmp_path, recipe):
    """As shipped, no overrides: the hub's tokenizer and UltraChat are not here, so their stand-ins are read."""
    report = assert_passed(dry_run(REPO / "recipes" / recipe, tmp_path, "--nproc_per_node", "8"), tmp_path)
    for said in ("STAND-IN tokenizer", "STAND-IN data for data.train.0 (HuggingFaceH4/ultrachat_200k, split train_sft",
                 "STAND-IN data for data.eval.0", "flash_attention_2 -> sdpa", "bf16/fp16 off",
                 "vocab 128256", "<|start_header_id|>assistant<|end_header_id|>"):
        assert said in report, said


def test_template_under_which_no_token_carries_loss(tmp_path):
    model = tmp_path / "model"
    shutil.copytree(REPO / "recipes" / "smoke" / "model", model)
    template = model / "chat_template.jinja"  # the answer moved out of the (now empty) generation block
    template.write_text(template.read_text().replace("{% generation %}{{ m['content'] }}{{ eos_token }}",
                                                     "{{ m['content'] }}{{ eos_token }}{% generation %}"))
    recipe = smoke_recipe(tmp_path, model={"name_or_path": str(model)})
    assert_failed_at(dry_run(recipe, tmp_path), "loss tokens", "0% of tokens carry loss", "{% generation %}")


def test_lora_targets_that_match_nothing(tmp_path):
    recipe = smoke_recipe(tmp_path, lora={"target_modules": ["qkv_proj"]}, deepspeed=GATHER)
    assert_failed_at(dry_run(recipe, tmp_path), "recipe valid", "qkv_proj", "matches no module")


def test_every_example_longer_than_max_length(tmp_path):
    recipe = smoke_recipe(tmp_path, training={"max_length": 8, "assistant_only_loss": False})
    assert_failed_at(dry_run(recipe, tmp_path), "tokens/example", "100% truncated", "max_length 8")


def test_zero3_lora_without_gathering_weights_on_save(tmp_path):
    recipe = smoke_recipe(tmp_path, lora={"target_modules": "all-linear"})
    assert_failed_at(dry_run(recipe, tmp_path), "recipe valid", "stage3_gather_16bit_weights_on_model_save")


def test_launch_dry_run_plans_for_its_ranks_and_starts_none(tmp_path):
    result = cli("launch", REPO / "recipes" / "smoke.yaml", "--nproc_per_node", 2, "--dry_run", "--tiny",
                 f"--run.output_dir={tmp_path / 'run'}")
    report = assert_passed(result, tmp_path)
    assert "world size 2" in report and "deepspeed" not in result.stdout


def test_submit_preflight_stops_a_broken_recipe_before_the_queue(tmp_path):
    recipe = smoke_recipe(tmp_path, training={"max_length": 8})  # every example is longer
    result = cli("submit", recipe, "--nodes", 2, "--gpus_per_node", 1, "--preflight", "--tiny")
    assert_failed_at(result, "tokens/example", "100% truncated")
    assert "submitted job" not in result.stdout and not (tmp_path / "run").exists()
