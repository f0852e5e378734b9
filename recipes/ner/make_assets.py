"""Build the NER recipe's shipped assets: short synthetic sentences, pre-split into words, with one BIO tag per word
(persons, places and organisations, some of them several words long and some sentences holding two of one type), a
lower-cased WordPiece tokenizer with BERT's special tokens whose small vocabulary splits the rarer names into several
sub-tokens (so word-to-token label alignment matters), and a ~0.1 M-param BERT-shaped encoder with seeded random
weights: the stand-in for a pretrained encoder that the recipe puts a token-classification head on. Deterministic;
the outputs are committed, so nothing here runs at training time.
Regenerate with: python recipes/ner/make_assets.py [OUT_DIR]
"""

from __future__ import annotations

import json
import random
import sys
from collections import Counter
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

ROWS = {"train": 2000, "eval": 200}
TAGS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"]  # id order
SPECIAL = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
           "mask_token": "[MASK]"}
ENTITIES = {
    "PER": ["Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry", "Maria", "John Smith",
            "Anna Lee", "Peter Brown", "Olga Petrova", "Kenji Watanabe", "Fatima Zahra", "Liam", "Sofia",
            "Yusuf Demir", "Ingrid Halvorsen", "Mateo Alvarez", "Priya Raman", "Tom", "Chloe Martin",
            "Nikolai Volkov", "Zanele Mokoena", "Oscar", "Bartholomew Finch", "Siobhan", "Wei Zhang", "Ravi"],
    "LOC": ["Paris", "London", "Berlin", "Tokyo", "Madrid", "Rome", "Cairo", "Lima", "Oslo", "Boston",
            "New York", "Rio de Janeiro", "Los Angeles", "San Francisco", "Hong Kong", "Buenos Aires",
            "Cape Town", "New Delhi", "Kuala Lumpur", "Reykjavik", "Ouagadougou", "Vladivostok", "Nairobi",
            "Texas", "Brazil", "Canada", "Japan", "Kyrgyzstan", "Saint Petersburg", "Lake Titicaca"],
    "ORG": ["Acme Corp", "Globex Industries", "Initech", "Umbrella Corporation", "Stark Industries",
            "Wayne Enterprises", "Hooli", "Vandelay Industries", "Cyberdyne Systems", "Soylent", "United Nations",
            "Greenpeace", "Oxfam", "Red Cross", "Massive Dynamic", "Tyrell Corporation", "Wonka", "Aperture Science",
            "Nakatomi Trading", "Oscorp"],
}
TEMPLATES = [
    "{PER} flew to {LOC} to meet {ORG} staff .",
    "{PER} and {PER} visited {LOC} last summer .",
    "{ORG} opened a new office in {LOC} .",
    "{PER} works for {ORG} in {LOC} .",
    "The train from {LOC} to {LOC} was late again .",
    "{ORG} hired {PER} as a consultant .",
    "{ORG} and {ORG} announced a merger on Monday .",
    "Yesterday , {PER} said that {ORG} will expand .",
    "{PER} moved from {LOC} to {LOC} in 2019 .",
    "According to {PER} , the weather in {LOC} is mild .",
    "{PER} met {PER} at the {ORG} conference .",
    "Shares of {ORG} rose after {PER} resigned .",
    "{PER} grew up near {LOC} .",
    "The mayor of {LOC} thanked {ORG} for the donation .",
    "Nobody at {ORG} expected the news .",
    "Did {PER} really call {PER} from {LOC} ?",
]


def sentence(rng: random.Random) -> dict:
    words = rng.choice(TEMPLATES).split()
    # distinct fillers for a type that occurs twice ("{PER} and {PER}"): sample without replacement per type
    fillers = {kind: rng.sample(names, sum(w == "{" + kind + "}" for w in words)) for kind, names in ENTITIES.items()}
    tokens, tags = [], []
    for word in words:
        kind = word[1:-1] if word.startswith("{") else None
        if kind is None:
            tokens.append(word)
            tags.append("O")
            continue
        for i, part in enumerate(fillers[kind].pop().split()):
            tokens.append(part)
            tags.append(("B-" if i == 0 else "I-") + kind)
    return {"tokens": tokens, "tags": tags}


def wordpiece_vocab(texts: list[str], size: int) -> dict[str, int]:
    """WordPiece vocabulary learnt the way tokenizers' WordPieceTrainer does it (BPE merges over "##"-continued
    characters, most frequent pair first), but with ties broken by the pair's text: the library breaks them by ids
    handed out in hash-map order, so its vocabulary differs from run to run (huggingface/tokenizers#1794)."""
    normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    counts = Counter(word for text in texts
                     for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    words = {word: [word[0]] + ["##" + c for c in word[1:]] for word in sorted(counts)}
    vocab = list(SPECIAL.values()) + sorted({piece for pieces in words.values() for piece in pieces})
    known = set(vocab)
    while len(vocab) < size:
        pairs = Counter()
        for word, pieces in words.items():
            for pair in zip(pieces, pieces[1:], strict=False):
                pairs[pair] += counts[word]
        if not pairs:
            break
        a, b = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merged = a + b[2:]
        if merged not in known:
            vocab.append(merged)
            known.add(merged)
        for pieces in words.values():
            i = 0
            while i < len(pieces) - 1:
                if (pieces[i], pieces[i + 1]) == (a, b):
                    pieces[i:i + 2] = [merged]
                i += 1
    return {piece: i for i, piece in enumerate(vocab)}


def tokenizer(texts: list[str], vocab_size: int = 400, max_length: int = 64, **extra) -> PreTrainedTokenizerFast:
    wordpiece = Tokenizer(models.WordPiece(wordpiece_vocab(texts, vocab_size), unk_token=SPECIAL["unk_token"]))
    wordpiece.normalizer = normalizers.BertNormalizer(lowercase=True)
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wordpiece.decoder = decoders.WordPiece()
    cls, sep = (wordpiece.token_to_id(SPECIAL[k]) for k in ("cls_token", "sep_token"))
    wordpiece.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return PreTrainedTokenizerFast(tokenizer_object=wordpiece, model_max_length=max_length, **SPECIAL, **extra)


def main(out: Path) -> None:
    rng = random.Random(0)
    splits = {"train": [sentence(rng) for _ in range(ROWS["train"])], "eval": []}
    seen = {tuple(row["tokens"]) for row in splits["train"]}
    while len(splits["eval"]) < ROWS["eval"]:  # the short templates repeat: keep eval's sentences out of train
        row = sentence(rng)
        if tuple(row["tokens"]) not in seen:
            seen.add(tuple(row["tokens"]))
            splits["eval"].append(row)
    assert all(tag in TAGS for rows in splits.values() for row in rows for tag in row["tags"])
    (out / "data").mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        with open(out / "data" / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(row, sort_keys=True) + "\n" for row in rows)
    tok = tokenizer([" ".join(row["tokens"]) for row in splits["train"]])
    tok.save_pretrained(out / "model")
    config = BertConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64, pad_token_id=tok.pad_token_id,
                        dtype="float32")
    torch.manual_seed(0)
    BertModel(config).save_pretrained(out / "model")

    words = split = longest = 0
    for rows in splits.values():
        for row in rows:
            word_ids = tok(row["tokens"], is_split_into_words=True).word_ids()
            pieces = [word_ids.count(i) for i in range(len(row["tokens"]))]
            words += len(pieces)
            split += sum(n > 1 for n in pieces)
            longest = max(longest, len(word_ids))
    print(f"vocab {len(tok)}; words split into >1 sub-token: {split}/{words} = {split / words:.1%}; "
          f"longest encoded row: {longest} tokens")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent)
