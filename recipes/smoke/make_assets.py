"""Build the smoke recipe's shipped assets: arithmetic chats, a byte-level BPE tokenizer with a chat template,
and a ~1 M-parameter Llama with seeded random weights (4 MB: the "pretrained" base that LoRA runs adapt and
consolidation merges into). Deterministic; the outputs are committed, so nothing here runs at training time.
Regenerate with: python recipes/smoke/make_assets.py [OUT_DIR]
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

ROWS = 4000
BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
# {% generation %} marks what the model learns: the answer and its end-of-turn token (assistant_only_loss).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}<|assistant|>{% generation %}"
    "{{ m['content'] }}{{ eos_token }}{% endgeneration %}{% else %}<|{{ m['role'] }}|>{{ m['content'] }}"
    "{{ eos_token }}{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def chats(rng: random.Random) -> list[dict]:
    rows = []
    for _ in range(ROWS):
        a, b = rng.randrange(100), rng.randrange(100)
        if rng.random() < 0.5:
            question, answer = f"What is {a} plus {b}?", a + b
        else:
            a, b = max(a, b), min(a, b)
            question, answer = f"What is {a} minus {b}?", a - b
        rows.append({"messages": [{"role": "user", "content": question},
                                  {"role": "assistant", "content": str(answer)}]})
    return rows


def tokenizer(rows: list[dict]) -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[PAD, BOS, EOS, *ROLE_TOKENS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator((turn["content"] for row in rows for turn in row["messages"]), trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                  additional_special_tokens=ROLE_TOKENS, model_max_length=256)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def model_config(tok: PreTrainedTokenizerFast) -> tuple[LlamaConfig, GenerationConfig]:
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    return LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       tie_word_embeddings=False, dtype="float32", **ids), GenerationConfig(**ids)


def main(out: Path) -> None:
    rows = chats(random.Random(0))
    (out / "data").mkdir(parents=True, exist_ok=True)
    with open(out / "data" / "train.jsonl", "w") as f:
        f.writelines(json.dumps(row, sort_keys=True) + "\n" for row in rows)
    tok = tokenizer(rows)
    tok.save_pretrained(out / "model")
    config, generation = model_config(tok)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config = generation
    model.save_pretrained(out / "model")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent)
