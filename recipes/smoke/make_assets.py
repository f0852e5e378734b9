"""Build the smoke recipe's shipped assets: chats that ask to reverse a few letters, a byte-level BPE tokenizer with a
chat template, and a ~1 M-parameter Llama with seeded random weights (4 MB: the "pretrained" base that LoRA runs
adapt and consolidation merges into). Deterministic; the outputs are committed, so nothing here runs at training
time. Regenerate with: python recipes/smoke/make_assets.py [OUT_DIR]

Why this task: the demo must show a model that learns, on 2 CPU ranks in about a minute. Chosen by measuring (issue
16; this model, 2 CPU ranks, ZeRO-3, global batch 32, learning rate 3e-3 with a cosine schedule; exact match on 200
held-out questions): two-digit arithmetic stayed at 0% after 150 steps (the model learns the answers' shape, not
the sums); sorting three numbers reached 58% after 600 steps; "which is larger, a or b?" stayed at chance after 300
(the answer must be copied from the question, and copying had not started). Reversing letters is learned, one
length at a time: with 3 to 6 letters, 36% to 97% after 300 steps depending on the run; with 3 to 5, 95% to 100%
for seed 0 but 67% for seed 1 after 400 (3 and 4 letters all right, 5 letters 4 of 70). With 3 or 4 letters and
50 warmup steps (recipes/smoke.yaml): 100% from step 225 on for seeds 0, 1 and 2 (with 10 warmup steps seed 1 never
started copying); 475,000 possible questions leave plenty never trained on.
"""

from __future__ import annotations

import json
import random
import string
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

ROWS, HELD_OUT = 4000, 200
BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
# {% generation %} marks what the model learns: the answer and its end-of-turn token (assistant_only_loss).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}<|assistant|>{% generation %}"
    "{{ m['content'] }}{{ eos_token }}{% endgeneration %}{% else %}<|{{ m['role'] }}|>{{ m['content'] }}"
    "{{ eos_token }}{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def chats(rng: random.Random) -> tuple[list[dict], list[dict]]:
    """ROWS training chats and HELD_OUT others whose question is in none of them: 'Reverse: q w e r' -> 'r e w q',
    3 or 4 letters."""
    seen, rows = set(), []
    while len(rows) < ROWS + HELD_OUT:
        letters = [rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 4))]
        question = "Reverse: " + " ".join(letters)
        if question in seen:
            continue
        seen.add(question)
        rows.append({"messages": [{"role": "user", "content": question},
                                  {"role": "assistant", "content": " ".join(reversed(letters))}]})
    return rows[:ROWS], rows[ROWS:]


def tokenizer(rows: list[dict]) -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE())
    # a space before each message, so a letter in the answer is the same token as in the question
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
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
    train, held_out = chats(random.Random(0))
    (out / "data").mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("heldout", held_out)):
        with open(out / "data" / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(row, sort_keys=True) + "\n" for row in rows)
    tok = tokenizer(train)
    tok.save_pretrained(out / "model")
    config, generation = model_config(tok)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config = generation
    model.save_pretrained(out / "model")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent)
