"""--tiny: every shipped recipe's architecture at a toy size, and the stand-in Llama 3.1 tokenizer."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from launcher import memory, tiny
from tests.helpers import REPO

CONFIGS = {
    "recipes/smoke.yaml": REPO / "recipes/smoke/model/config.json",
    "recipes/llama-3.1-8b/full.yaml": REPO / "recipes/llama-3.1-8b/config.json",
    "recipes/llama-3.1-8b/lora.yaml": REPO / "recipes/llama-3.1-8b/config.json",
    "recipes/llama-3.1-70b/lora.yaml": REPO / "recipes/llama-3.1-70b/config.json",
    "recipes/sentiment.yaml": REPO / "recipes/sentiment/model/config.json",
    "recipes/ner.yaml": REPO / "recipes/ner/model/config.json",
    "recipes/qa.yaml": REPO / "recipes/qa/model/config.json",
}


def test_every_shipped_recipe_is_covered():
    shipped = {str(p.relative_to(REPO)) for p in REPO.glob("recipes/**/*.yaml")}
    assert shipped and shipped == set(CONFIGS)


@pytest.mark.parametrize("recipe", sorted(CONFIGS))
def test_tiny_model_keeps_architecture_vocab_and_module_names(recipe):
    config = json.loads(CONFIGS[recipe].read_text())
    model = tiny.build_model(config)
    assert type(model).__name__ == config["architectures"][0]
    assert model.config.model_type == config["model_type"]
    assert model.config.vocab_size == config["vocab_size"]
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 64
    assert sum(p.numel() for p in model.parameters()) < 20_000_000
    linear = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    if config["model_type"] in memory.FAMILIES:  # decoders: the names LoRA targets and plan's estimate go by
        assert linear == memory.linear_module_names(config)
    lora = (yaml.safe_load((REPO / recipe).read_text()).get("lora") or {}).get("target_modules", "all-linear")
    if lora != "all-linear":
        assert set(lora) <= linear
    if config.get("num_key_value_heads", config["num_attention_heads"]) < config["num_attention_heads"]:
        assert model.config.num_key_value_heads < model.config.num_attention_heads  # grouped-query attention kept


def test_tiny_model_is_seeded():
    config = json.loads(CONFIGS["recipes/smoke.yaml"].read_text())
    first, second = tiny.build_model(config, seed=3), tiny.build_model(config, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters(), strict=True))


def test_stand_in_tokenizer_renders_llama_3_1_chat():
    from transformers import AutoTokenizer

    config = json.loads(CONFIGS["recipes/llama-3.1-70b/lora.yaml"].read_text())
    path = tiny.stand_in_tokenizer(config)
    assert path is not None and path.is_dir()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    chat = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]
    ids = tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"]
    special = {t: tokenizer.convert_tokens_to_ids(t) for t in
               ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")}
    assert special == {"<|begin_of_text|>": 128000, "<|start_header_id|>": 128006, "<|end_header_id|>": 128007,
                       "<|eot_id|>": 128009}
    assert ids[0] == 128000 and ids[-1] == 128009 and ids.count(128006) == 3  # system, user, assistant headers
    assert max(ids) < config["vocab_size"] and max(tokenizer.all_special_ids) < config["vocab_size"]
    text = tokenizer.decode(ids)
    assert "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>" in text
    assert tokenizer.eos_token == "<|eot_id|>"


def test_no_stand_in_for_an_unknown_family():
    assert tiny.stand_in_tokenizer({"model_type": "qwen2", "vocab_size": 151936}) is None


def test_generation_stops_at_the_chat_templates_end_of_turn():
    from transformers import AutoTokenizer, GenerationConfig

    from launcher import modeling

    tokenizer = AutoTokenizer.from_pretrained(REPO / "recipes/smoke/model")
    generation = GenerationConfig(eos_token_id=7)  # a model whose own EOS is not the chat's end of turn
    modeling.stop_at_end_of_turn(generation, tokenizer)
    assert generation.eos_token_id == [7, tokenizer.convert_tokens_to_ids("<|eos|>")]
    assert generation.pad_token_id == tokenizer.pad_token_id
