"""Offline stand-ins for `launcher train RECIPE --dry_run --tiny` of the Llama 3.1 recipes, whose tokenizer and data
live on the Hugging Face hub: a Llama 3.1 tokenizer look-alike and a small chat sample in UltraChat's schema.

- llama-3.1-tokenizer/: a byte-level BPE trained on the sample (so token counts are of the right order, not equal
  to the real tokenizer's), with Llama 3.1's 256 special tokens at their real ids 128000-128255 (<|begin_of_text|>,
  <|start_header_id|>, <|end_header_id|>, <|eot_id|>, ...) and Llama 3.1's chat template, copied verbatim
  (llama3_1.jinja here, from TRL's trl/chat_templates/llama3_1.jinja).
  Every id is below the model's vocab_size 128256. It is NOT the real tokenizer: it only lets the dry run render
  and mask chats exactly as the Llama 3.1 template does.
- ultrachat_sample.jsonl: 64 synthetic multi-turn chats with UltraChat's `messages` column (user/assistant turns).

Deterministic; the outputs are committed. Regenerate with: python recipes/stand-ins/make_assets.py
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # the BPE trainer's merges do not depend on thread timing

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

HERE = Path(__file__).resolve().parent
ROWS = 64
BPE_VOCAB = 2000
FIRST_SPECIAL = 128000
NAMED = {0: "<|begin_of_text|>", 1: "<|end_of_text|>", 4: "<|finetune_right_pad_id|>", 6: "<|start_header_id|>",
         7: "<|end_header_id|>", 8: "<|eom_id|>", 9: "<|eot_id|>", 10: "<|python_tag|>"}

TOPICS = ["the water cycle", "compound interest", "photosynthesis", "binary search", "the French Revolution",
          "sourdough bread", "plate tectonics", "public key cryptography", "marathon training", "jazz harmony",
          "the immune system", "solar panels", "supply and demand", "black holes", "composting", "gradient descent"]
OPENERS = ["Can you explain {t} in simple terms?", "What are the most important things to know about {t}?",
           "I am writing a short essay on {t}. Where should I start?", "Give me three surprising facts about {t}."]
FOLLOW_UPS = ["Thanks. Could you give a concrete example?", "How would you explain that to a ten-year-old?",
              "What is a common misconception about it?", "Can you summarise that in two sentences?"]
SENTENCES = ["{T} is easiest to understand by starting from first principles.",
             "At its core, {t} describes how a system changes over time.",
             "Many people first meet {t} in school, but it matters well beyond the classroom.",
             "A useful way to think about {t} is as a set of trade-offs rather than a single rule.",
             "Historically, ideas about {t} developed over several centuries.",
             "In practice, the details of {t} depend on the context you are working in.",
             "One concrete example: imagine tracking {t} step by step with a notebook.",
             "The key point is that small changes early on can have large effects later.",
             "Experts disagree on some of the finer points, but the basics are well established.",
             "If you remember only one thing, remember that {t} is about relationships between parts."]


def special_tokens() -> list[str]:
    tokens, reserved = [], 0
    for i in range(256):
        if i in NAMED:
            tokens.append(NAMED[i])
        else:
            tokens.append(f"<|reserved_special_token_{reserved}|>")
            reserved += 1
    return tokens


def answer(rng: random.Random, topic: str) -> str:
    picked = rng.sample(SENTENCES, rng.randint(2, 7))
    return " ".join(s.format(t=topic, T=topic[0].upper() + topic[1:]) for s in picked)


def chats(rng: random.Random) -> list[dict]:
    rows = []
    for _ in range(ROWS):
        topic = rng.choice(TOPICS)
        messages = [{"role": "user", "content": rng.choice(OPENERS).format(t=topic)},
                    {"role": "assistant", "content": answer(rng, topic)}]
        for _ in range(rng.randint(0, 2)):
            messages += [{"role": "user", "content": rng.choice(FOLLOW_UPS)},
                         {"role": "assistant", "content": answer(rng, topic)}]
        rows.append({"prompt": messages[0]["content"], "messages": messages})
    return rows


def tokenizer(rows: list[dict], out: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator((turn["content"] for row in rows for turn in row["messages"]), trainer)
    spec = json.loads(bpe.to_str())
    for i, tok in enumerate(special_tokens()):  # in the model's vocab too, or tokenizers renumbers them from 786
        spec["model"]["vocab"][tok] = FIRST_SPECIAL + i
    spec["added_tokens"] = [{"id": FIRST_SPECIAL + i, "content": tok, "single_word": False, "lstrip": False,
                             "rstrip": False, "normalized": False, "special": True}
                            for i, tok in enumerate(special_tokens())]
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
                                  bos_token=NAMED[0], eos_token=NAMED[9], model_max_length=131072)
    tok.chat_template = (HERE / "llama3_1.jinja").read_text()
    tok.save_pretrained(out)


def main() -> None:
    rows = chats(random.Random(0))
    with open(HERE / "ultrachat_sample.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    tokenizer(rows, HERE / "llama-3.1-tokenizer")
    print(f"wrote {HERE / 'ultrachat_sample.jsonl'} ({len(rows)} chats) and {HERE / 'llama-3.1-tokenizer'}")


if __name__ == "__main__":
    main()
