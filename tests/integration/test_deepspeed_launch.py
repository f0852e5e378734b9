"""Real runs: `launcher launch` starts the real `deepspeed` launcher, 2 CPU ranks on gloo, TRL SFTTrainer, ZeRO-2/3."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from tests.helpers import (
    GATHER,
    QUICK,
    REPO,
    assert_every_rank_wrote_shards,
    cli,
    free_port,
    last_checkpoint,
    launch,
    smoke_recipe,
)

pytestmark = pytest.mark.integration


def losses(run_dir: Path) -> list[float]:
    state = json.loads((run_dir / "checkpoints" / "trainer_state.json").read_text())
    return [e["loss"] for e in state["log_history"] if "loss" in e]


def assert_ranks_used_planned_config(run_dir: Path, plan: dict, world: int) -> None:
    assert json.loads((run_dir / "ds_config.json").read_text()) == plan["deepspeed"]
    for rank in range(world):
        used = json.loads((run_dir / "ranks" / f"rank{rank}.json").read_text())
        assert used["world_size"] == world
        # accelerate always sets steps_per_print to infinity, silencing DeepSpeed's own step log; all else is ours
        assert used["deepspeed"].pop("steps_per_print") == float("inf")
        assert used["deepspeed"] == plan["deepspeed"], f"rank {rank} ran a different DeepSpeed config"


def test_smoke_recipe_zero3_full_finetune_learns(tmp_path):
    """The shipped smoke recipe, unchanged but for its run directory: loss ends below half its first value, and the
    model learned its task: it reverses the letters of 200 held-out questions it never trained on (exact match
    >= 0.9, printed at the end with three examples), the same score `launcher evaluate` gives on the held-out file."""
    result, plan = launch(REPO / "recipes" / "smoke.yaml", "--nproc_per_node", 2,
                          f"--run.output_dir={tmp_path / 'run'}")
    run_dir = tmp_path / "run"
    curve = losses(run_dir)
    assert curve[-1] < curve[0] / 2, curve
    assert_every_rank_wrote_shards(run_dir, 2)
    assert_ranks_used_planned_config(run_dir, plan, 2)
    assert plan["deepspeed"]["zero_optimization"]["stage"] == 3
    assert f"run directory: {run_dir}" in result.stdout
    assert "zero_to_fp32" not in result.stdout + result.stderr  # the launcher consolidates: no advice to
    speed = next(line for line in result.stdout.splitlines() if line.startswith("speed: "))  # no GPU: no MFU
    assert re.fullmatch(r"speed: [\d,]+ non-padding tokens/s \([\d,]+ per device\), \d+\.\d% of the positions "
                        r"trained were padding", speed), speed
    assert_final_model_serves(run_dir / "final")
    assert_final_eval_loss_matches(run_dir)
    assert result.stdout.strip().splitlines()[-1] == f"finished: {run_dir / 'final'}"
    assert_learned_the_task(result.stdout, run_dir / "final")
    assert_curves(run_dir, result.stdout)
    assert_evaluate_reports(run_dir / "final", first_loss=curve[0])
    evals = [e for e in json.loads((run_dir / "checkpoints" / "trainer_state.json").read_text())["log_history"]
             if "eval_loss" in e]
    assert evals and all(e["eval_perplexity"] == pytest.approx(math.exp(e["eval_loss"])) for e in evals)
    # run.eval_answers: scored at each evaluation; at the last, the same weights give the consolidated model's score
    assert [e["step"] for e in evals] == [50, 100, 150, 200, 250, 300]
    assert evals[0]["eval_exact_match"] < 0.5 <= evals[-1]["eval_exact_match"], evals
    scored = json.loads((run_dir / "final" / "metrics-eval.json").read_text())
    assert evals[-1]["eval_exact_match"] == pytest.approx(scored["exact_match"])
    assert evals[-1]["eval_f1"] == pytest.approx(scored["f1"])
    assert_quiet_console(result, run_dir, evals)


def assert_quiet_console(result, run_dir: Path, evals: list[dict]) -> None:
    """One progress bar and a line per evaluation; DeepSpeed's INFO lines and the logged dicts only in the run
    directory: the ranks' whole output in logs/launch-node0.log, each logged dict in logs/metrics.jsonl."""
    shown = result.stdout + result.stderr
    assert "[INFO]" not in shown and "Setting accelerator to CPU" not in shown
    assert "{'loss'" not in shown and "{'eval_loss'" not in shown
    for e in evals:
        assert (f"step {e['step']}: eval loss {e['eval_loss']:.4g}, exact match {e['eval_exact_match']:.4g}, "
                f"f1 {e['eval_f1']:.4g}") in result.stdout
    assert "Writing model shards" not in shown and "Loading weights" not in shown
    log = (run_dir / "logs" / "launch-node0.log").read_text()
    assert "[INFO] [launch.py" in log and "Setting accelerator to CPU" in log and "done: 300 steps" in log
    logged = [json.loads(line) for line in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [e["eval_exact_match"] for e in logged if "eval_loss" in e] == [e["eval_exact_match"] for e in evals]
    assert sum("loss" in e for e in logged) == 30  # logging_steps 10
    assert f"logs:          {run_dir / 'logs'}" in result.stdout


def test_answer_scores_during_training_shared_out_between_ranks(tmp_path):
    """run.eval_answers on 7 rows over 2 ZeRO-3 ranks (4 and 3, answered in batches of 2, so one rank answers a
    repeat it must not count): the score logged at the last evaluation is the one `launcher evaluate` gives the
    consolidated model on the same 7 rows, half-way through learning, where a miscounted row would show. --verbose:
    the console shows DeepSpeed's lines and HF's logged dicts as they are."""
    recipe = smoke_recipe(tmp_path, run={"eval_answers": 7},
                          training={"max_steps": 100, "per_device_eval_batch_size": 2, "save_steps": 100})
    result = cli("launch", recipe, "--nproc_per_node", 2, "--master_port", free_port(), "--verbose")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-6000:]
    run_dir = tmp_path / "run"
    state = json.loads((run_dir / "checkpoints" / "trainer_state.json").read_text())
    last = [e for e in state["log_history"] if "eval_loss" in e][-1]
    assert last["step"] == 100
    held_out = REPO / "recipes/smoke/data/heldout.jsonl"
    scored = cli("evaluate", run_dir / "final", "--data", held_out, "--max_rows", 7, "--output", tmp_path / "7.json")
    assert scored.returncode == 0, scored.stderr
    again = json.loads((tmp_path / "7.json").read_text())
    assert again["answered"] == 7 and 0 < again["exact_match"] < 1, again  # learning: some right, some not
    assert last["eval_exact_match"] == pytest.approx(again["exact_match"]), (last, again)
    assert last["eval_f1"] == pytest.approx(again["f1"])
    assert "[INFO] [launch.py" in result.stdout + result.stderr and "{'loss'" in result.stdout + result.stderr


def assert_learned_the_task(printed: str, final: Path) -> None:
    scored = json.loads((final / "metrics-eval.json").read_text())
    assert scored["answered"] == 200 and scored["exact_match"] >= 0.9, scored
    assert re.search(rf"^exact_match +{scored['exact_match']:.4f}$", printed, re.M)
    assert printed.count("\nprompt:    Reverse: ") == 3 and printed.count("\ngenerated: ") == 3
    result = cli("evaluate", final, "--data", REPO / "recipes/smoke/data/heldout.jsonl")
    assert result.returncode == 0, result.stderr
    again = json.loads((final / "metrics-heldout.json").read_text())
    assert again["answered"] == 200 and again["exact_match"] == scored["exact_match"]
    assert f"exact_match  {scored['exact_match']:.4f}" in result.stdout


def assert_curves(run_dir: Path, printed: str) -> None:
    """curves.png: a real image (read back), said where it is, and embedded in the model card."""
    from PIL import Image

    image = Image.open(run_dir / "curves.png")
    assert image.format == "PNG" and image.size[0] >= 800  # losses, and the eval metrics beside them
    assert f"curves:        {run_dir / 'curves.png'}" in printed
    assert "![training and eval curves](curves.png)" in (run_dir / "final" / "README.md").read_text()
    assert (run_dir / "final" / "curves.png").read_bytes() == (run_dir / "curves.png").read_bytes()


def assert_evaluate_reports(final: Path, first_loss: float) -> None:
    """`launcher evaluate` on chat rows: the trained model's loss on the answers (well below where training
    started), its perplexity, and greedy answers to three prompts, printed and written as JSON."""
    result = cli("evaluate", final, "--data", REPO / "recipes/smoke/data/train.jsonl", "--max_rows", 64)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((final / "metrics-train.json").read_text())
    assert metrics["rows"] == 64 and metrics["loss"] < first_loss / 2
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]))
    assert len(metrics["samples"]) == 3
    assert metrics["answered"] == 64 and 0 <= metrics["exact_match"] <= metrics["f1"] <= 1  # every row answered
    assert "exact_match" in result.stdout
    for sample in metrics["samples"]:
        assert re.fullmatch(r"[a-z]( [a-z])*", sample["generated"]), sample  # letters, as the answers are
        assert f"generated: {sample['generated']}" in result.stdout


def assert_final_eval_loss_matches(run_dir: Path) -> None:
    """The consolidated fp32 model scores the run's eval split as the trainer did at its last step (2 ranks then,
    one process now, batches of the recipe's eval batch size)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from launcher import data
    from launcher import recipe as recipes

    recipe = recipes.load(str(run_dir / "recipe.yaml"))
    _, eval_set = data.load(recipe, "recipe.yaml", seed=recipe.training["seed"])
    args = SFTConfig(output_dir=str(run_dir / "eval"), use_cpu=True, report_to="none",
                     per_device_eval_batch_size=recipe.training.get("per_device_eval_batch_size", 8),
                     max_length=recipe.training["max_length"], assistant_only_loss=True, bf16=False)
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(run_dir / "final"), args=args,
                         train_dataset=eval_set, eval_dataset=eval_set,  # train_dataset: required, unused
                         processing_class=AutoTokenizer.from_pretrained(run_dir / "final"))
    state = json.loads((run_dir / "checkpoints" / "trainer_state.json").read_text())
    final_eval = [e["eval_loss"] for e in state["log_history"] if "eval_loss" in e][-1]
    assert abs(trainer.evaluate()["eval_loss"] - final_eval) < 1e-4


def assert_final_model_serves(final: Path) -> None:
    """The consolidated model loads completely and answers a chat prompt, stopping at the end-of-turn token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    model, info = AutoModelForCausalLM.from_pretrained(final, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert json.loads((final / "config.json").read_text())["dtype"] == "float32"
    assert not list(final.glob("*.bin")) and (final / "model.safetensors.index.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(final)
    end_of_turn = tokenizer.convert_tokens_to_ids("<|eos|>")
    assert end_of_turn in [GenerationConfig.from_pretrained(final).eos_token_id]
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Reverse: a b c"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = model.generate(**prompt, max_new_tokens=8, do_sample=False)[0, prompt["input_ids"].shape[1]:]
    assert end_of_turn in output.tolist()  # (what it answers depends on how long it trained: the smoke test checks)
    assert "final loss" in (final / "README.md").read_text()


def test_zero2_full_finetune(tmp_path):
    """Also: devices chosen with CUDA_VISIBLE_DEVICES reach the ranks (DeepSpeed alone gives them 0..N-1)."""
    recipe = smoke_recipe(tmp_path, training=QUICK, deepspeed={"config": str(REPO / "ds_configs/zero2.json")})
    _, plan = launch(recipe, "--nproc_per_node", 2, env={"CUDA_VISIBLE_DEVICES": "5,7", "OMP_NUM_THREADS": "1"})
    run_dir = tmp_path / "run"
    for rank in (0, 1):
        assert json.loads((run_dir / "ranks" / f"rank{rank}.json").read_text())["visible_devices"] == "5,7"
    curve = losses(run_dir)
    assert curve[-1] < curve[0], curve
    assert_every_rank_wrote_shards(run_dir, 2)
    assert_ranks_used_planned_config(run_dir, plan, 2)
    assert_consolidation_needs_no_transformers(run_dir, tmp_path / "again")


def assert_consolidation_needs_no_transformers(run_dir: Path, out: Path) -> None:
    """A full fine-tune's fp32 checkpoint written by the worker consolidates without importing transformers or torch
    (seconds): the shards are read by launcher.zero_checkpoint, the tokenizer and generation config are copied,
    config.json edited as JSON; the result is the same model."""
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "launcher", "consolidate", run_dir, out],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time")}
    assert "launcher.zero_checkpoint" in imported  # the import log is read right
    assert "transformers" not in imported and "torch" not in imported
    for name in ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (out / name).read_bytes() == (run_dir / "final" / name).read_bytes(), name
    assert_final_model_serves(out)


def test_zero3_lora_saves_a_real_adapter(tmp_path):
    recipe = smoke_recipe(tmp_path, training={**QUICK, "learning_rate": 1e-2}, lora={"r": 8, "alpha": 16},
                          deepspeed={"overrides": GATHER})
    _, plan = launch(recipe, "--nproc_per_node", 2)
    run_dir = tmp_path / "run"
    curve = losses(run_dir)
    assert curve[-1] < curve[0], curve
    assert_every_rank_wrote_shards(run_dir, 2)
    assert_ranks_used_planned_config(run_dir, plan, 2)
    adapter = last_checkpoint(run_dir) / "adapter_model.safetensors"
    with safe_open(str(adapter), "pt") as f:
        names = list(f.keys())
        assert names and all(f.get_tensor(n).numel() > 0 for n in names)
        assert any("lora_B" in n and f.get_tensor(n).abs().sum() > 0 for n in names), "lora_B never trained"


def test_two_nodes_on_one_machine(tmp_path):
    """Two launcher invocations, node_rank 0 and 1, rendezvous at 127.0.0.1 without ssh: one 2-rank job."""
    recipe = smoke_recipe(tmp_path, training={**QUICK, "max_steps": 10, "save_steps": 10})
    port = free_port()
    common = [recipe, "--nnodes", 2, "--nproc_per_node", 1, "--master_addr", "127.0.0.1", "--master_port", port]
    env = {"OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen([sys.executable, "-m", "launcher", "launch", *map(str, common), "--node_rank", str(r)],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, **env}) for r in (0, 1)]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    run_dir = tmp_path / "run"
    assert_every_rank_wrote_shards(run_dir, 2)
    planned = cli("plan", *common, "--node_rank", 0, "--format", "json")
    assert_ranks_used_planned_config(run_dir, json.loads(planned.stdout), 2)


def test_deepspeed_called_directly(tmp_path):
    """A user who prefers DeepSpeed's own command gets the same worker, recipe and overrides included."""
    recipe = smoke_recipe(tmp_path)
    command = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
               "--module", "launcher.train", str(recipe), "--training.max_steps=6", "--training.save_steps=6",
               "--training.eval_strategy=no"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = tmp_path / "run"
    assert_every_rank_wrote_shards(run_dir, 2)
    assert "max_steps: 6" in (run_dir / "recipe.yaml").read_text()
    assert (run_dir / "checkpoints" / "checkpoint-6").is_dir()
