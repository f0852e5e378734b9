"""Packing (issue 15): a packed row must give each sequence the loss it has alone, and what would mix sequences is
refused before launch. The mixing model is the real tiny Llama with transformers' packed-sequence detection switched
off, as in an attention path that ignores where position_ids restart."""

from __future__ import annotations

import json

import pytest
import yaml

from launcher import packing
from tests.helpers import REPO, assert_rejected, cli, smoke_recipe

SMOKE_MODEL = REPO / "recipes" / "smoke" / "model"


@pytest.fixture(scope="module")
def model_and_sequences():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(SMOKE_MODEL)
    texts = ["What is 12 plus 30? 42", "7 times 6 is 42, and 6 times 7 too", "What is 9 minus 4? 5"]
    return SMOKE_MODEL, [tokenizer(t)["input_ids"] for t in texts]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_a_packed_row_gives_each_sequence_its_loss_alone(model_and_sequences, attention):
    from transformers import AutoModelForCausalLM

    path, sequences = model_and_sequences
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attention)
    losses = packing.compare(model, sequences, pad_id=0)
    assert len(losses) == 3 and all(alone > 1.0 for _, alone in losses)  # real losses of a barely trained model
    assert packing.worst(losses)[1] <= packing.TOLERANCE, losses


def test_attention_that_ignores_packed_boundaries_is_caught(model_and_sequences, monkeypatch):
    import transformers.masking_utils
    from transformers import AutoModelForCausalLM

    path, sequences = model_and_sequences
    monkeypatch.setattr(transformers.masking_utils, "find_packed_sequence_indices", lambda position_ids: None)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa")
    losses = packing.compare(model, sequences, pad_id=0)
    index, gap = packing.worst(losses)
    assert index >= 1 and gap > 10 * packing.TOLERANCE, losses  # a later sequence saw the one before it
    assert abs(losses[0][0] - losses[0][1]) <= packing.TOLERANCE * losses[0][1]  # the first one has nothing to see


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "mistral", "gemma2", "gpt2"])
def test_attention_models_may_pack(model_type):
    assert packing.mixing_cause(model_type) is None


@pytest.mark.parametrize("model_type", ["mamba", "jamba", "qwen3_next", "lfm2", "falcon_h1"])
def test_models_with_recurrent_layers_may_not(model_type):
    assert "carry a state from token to token" in packing.mixing_cause(model_type)


def config_recipe(tmp_path, model_type: str, **training):
    config = json.loads((SMOKE_MODEL / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": model_type}))
    recipe = smoke_recipe(tmp_path, training=training)
    raw = yaml.safe_load(recipe.read_text())
    raw["model"]["config"] = str(tmp_path / "config.json")
    recipe.write_text(yaml.safe_dump(raw))
    return recipe


def test_plan_refuses_packing_a_model_that_would_mix_sequences(tmp_path):
    recipe = config_recipe(tmp_path, "qwen3_next", packing=True)
    assert_rejected(cli("plan", recipe), "training.packing", "qwen3_next", "set training.packing: false")
    assert cli("plan", config_recipe(tmp_path, "llama", packing=True)).returncode == 0


def test_plan_refuses_padding_free_without_packing(tmp_path):
    assert_rejected(cli("plan", smoke_recipe(tmp_path, training={"padding_free": True})), "training.padding_free",
                    "max_length")


def test_plan_refuses_an_adapter_the_chunked_loss_would_never_train(tmp_path):
    recipe = smoke_recipe(tmp_path, lora={"r": 4, "target_modules": ["q_proj", "lm_head"]},
                          deepspeed={"config": "zero2"})
    assert_rejected(cli("plan", recipe), "lora.target_modules", "lm_head", "modules_to_save")


def test_plan_refuses_liger_fused_cross_entropy(tmp_path):
    recipe = smoke_recipe(tmp_path, training={"use_liger_kernel": True,
                                              "liger_kernel_config": {"fused_linear_cross_entropy": True}})
    assert_rejected(cli("plan", recipe), "training.liger_kernel_config", "fused_linear_cross_entropy")


def test_plan_refuses_non_reentrant_checkpointing_for_lora_under_zero3(tmp_path):
    gather = {"config": "zero3",
              "overrides": {"zero_optimization": {"stage3_gather_16bit_weights_on_model_save": True}}}
    recipe = smoke_recipe(tmp_path, lora={"r": 4}, deepspeed=gather,
                          training={"gradient_checkpointing": True,
                                    "gradient_checkpointing_kwargs": {"use_reentrant": False}})
    assert_rejected(cli("plan", recipe), "use_reentrant")


def test_liger_without_its_package_is_refused_before_launch_and_off_in_a_cpu_dry_run(tmp_path):
    import importlib.util

    from launcher import dry_run, preflight
    from launcher import recipe as recipes
    from launcher.errors import RecipeError

    assert importlib.util.find_spec("liger_kernel") is None  # not installed here (nor in CI): the real absence
    recipe = recipes.load(str(smoke_recipe(tmp_path, training={"use_liger_kernel": True,
                                                               "activation_offloading": True})))
    with pytest.raises(RecipeError, match=r"^r.yaml: training.use_liger_kernel needs liger-kernel 0.3.0"):
        preflight.check_packages(recipe, "r.yaml")
    changes = dry_run.cpu_fallbacks(recipe, "r.yaml")
    assert any("liger-kernel" in c for c in changes)  # the real run's refusal, said as a note
    assert not recipe.training["use_liger_kernel"] and not recipe.training["activation_offloading"]
    assert {"CPU: training.use_liger_kernel off (Liger's kernels are Triton GPU code)"} <= set(changes)
