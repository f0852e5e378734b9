"""Build the QA recipe's shipped assets: short synthetic biographies (4 to 7 facts, each of a different kind, in a
random order) with one question about one fact, in SQuAD's row format; a lower-cased WordPiece tokenizer with BERT's
special tokens, which gives question and context their segment ids (token_type_ids) as a pretrained BERT's does; and
a ~0.1 M-param BERT-shaped encoder with seeded random weights, the stand-in for a pretrained one. About half of the
questions with their contexts are longer than the recipe's 48-token window, so they are read in windows.
Deterministic (the vocabulary too: the NER script's tie-broken WordPiece); the outputs are committed.
Regenerate with: python recipes/qa/make_assets.py [OUT_DIR]
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import torch
from transformers import BertConfig, BertModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ner"))
from make_assets import tokenizer  # noqa: E402  (the NER encoder's WordPiece recipe, which is deterministic)

ROWS = {"train": 3000, "eval": 200}
PEOPLE = ["Alice", "Bob", "Carol", "Dan", "Erin", "Frank", "Grace", "Heidi", "Ivan", "Judy", "Mallory", "Oscar",
          "Peggy", "Rupert", "Sybil", "Trent", "Victor", "Walter", "Yara", "Zoe"]
# kind: (fact template, question template, values)
FACTS = {
    "home": ("{p} lives in {v}.", "Where does {p} live?",
             ["Paris", "New York", "Lima", "Oslo", "Cape Town", "Hanoi", "Rio de Janeiro", "Kyoto", "Dublin"]),
    "work": ("{p} works at {v}.", "Where does {p} work?",
             ["Acme Corp", "Globex", "Initech", "Umbrella Labs", "Stark Industries", "Hooli", "Vandelay"]),
    "born": ("{p} was born in {v}.", "When was {p} born?", [str(y) for y in range(1950, 2005)]),
    "plays": ("{p} plays the {v}.", "What does {p} play?",
              ["violin", "piano", "cello", "drums", "flute", "guitar", "harp", "trumpet"]),
    "drives": ("{p} drives a {v}.", "What does {p} drive?",
               ["red car", "blue truck", "green van", "old bicycle", "black scooter", "yellow taxi"]),
    "studied": ("{p} studied {v}.", "What did {p} study?",
                ["chemistry", "law", "history", "music theory", "computer science", "medicine", "art"]),
    "likes": ("{p} likes to eat {v}.", "What does {p} like to eat?",
              ["apples", "noodles", "fresh bread", "spicy curry", "cheese", "rice cakes"]),
    "pet": ("{p} has a pet {v}.", "What pet does {p} have?", ["cat", "dog", "parrot", "goldfish", "rabbit", "turtle"]),
}
FILLER = ["It rained that week.", "The town is quiet in winter.", "Everyone knows the old bridge.",
          "Most days begin early here."]


def row(rng: random.Random, name: str) -> dict:
    kinds = rng.sample(list(FACTS), rng.randint(4, 7))
    people = rng.sample(PEOPLE, len(kinds))
    sentences = [FACTS[k][0].format(p=p, v=rng.choice(FACTS[k][2])) for k, p in zip(kinds, people, strict=True)]
    sentences += rng.sample(FILLER, rng.randint(0, 2))
    rng.shuffle(sentences)
    asked = rng.randrange(len(kinds))
    kind, person = kinds[asked], people[asked]
    fact = next(s for s in sentences if s.startswith(person + " "))
    value = fact[len(FACTS[kind][0].split("{v}")[0].format(p=person)) : -1]
    context = " ".join(sentences)
    start = context.index(fact) + len(fact) - 1 - len(value)
    assert context[start : start + len(value)] == value
    return {"id": name, "question": FACTS[kind][1].format(p=person), "context": context,
            "answers": {"text": [value], "answer_start": [start]}}


def main(out: Path) -> None:
    rng = random.Random(0)
    splits = {split: [row(rng, f"{split}-{i}") for i in range(n)] for split, n in ROWS.items()}
    (out / "data").mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        with open(out / "data" / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in rows)
    tok = tokenizer([t for r in splits["train"] for t in (r["question"], r["context"])], vocab_size=400,
                    max_length=128, model_input_names=["input_ids", "token_type_ids", "attention_mask"])  # BERT's
    tok.save_pretrained(out / "model")
    config = BertConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=128, pad_token_id=tok.pad_token_id,
                        dtype="float32")
    torch.manual_seed(0)
    BertModel(config).save_pretrained(out / "model")
    lengths = sorted(len(tok(r["question"], r["context"])["input_ids"]) for r in splits["train"])
    print(f"question + context tokens: min {lengths[0]}, median {lengths[len(lengths) // 2]}, max {lengths[-1]}; "
          f"over 64: {sum(n > 64 for n in lengths) / len(lengths):.0%}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent)
