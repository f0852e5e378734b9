"""Build the sentiment recipe's shipped assets: short synthetic reviews labelled negative/positive (some negated, so
a word count alone is not enough), a lower-cased WordPiece tokenizer with BERT's special tokens, and a ~0.2 M-param
BERT-shaped encoder with seeded random weights: the stand-in for a pretrained encoder that the recipe puts a
classification head on. The outputs are committed, so nothing here runs at training time.
Regenerate with: python recipes/sentiment/make_assets.py [OUT_DIR]
The data and weights come out the same on every run; the vocabulary may not: tokenizers' WordPieceTrainer breaks
ties in hash-map order (huggingface/tokenizers#1794). recipes/ner/make_assets.py has a tie-broken WordPiece that is
deterministic; the committed sentiment tokenizer is kept as it is, since the tests' and the README's numbers use it.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

ROWS = {"train": 2000, "eval": 200}
SPECIAL = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
           "mask_token": "[MASK]"}
SUBJECTS = ["the movie", "this film", "the plot", "the acting", "the soundtrack", "the ending", "the cast",
            "this show", "the script", "the director's work"]
POSITIVE = ["great", "wonderful", "moving", "brilliant", "delightful", "superb", "charming", "gripping"]
NEGATIVE = ["awful", "boring", "dull", "terrible", "clumsy", "tedious", "bland", "painful"]
INTENSIFIERS = ["", "", "really ", "very ", "quite ", "truly "]
ENDINGS = [".", "!", ", I thought.", ", honestly.", " from start to finish."]


def review(rng: random.Random) -> dict:
    positive = rng.random() < 0.5
    negated = rng.random() < 0.15  # "not great" is negative: word identity alone does not decide
    word = rng.choice(NEGATIVE if positive == negated else POSITIVE)
    text = (f"{rng.choice(SUBJECTS)} was {'not ' if negated else ''}{rng.choice(INTENSIFIERS)}{word}"
            f"{rng.choice(ENDINGS)}")
    return {"text": text[0].upper() + text[1:], "label": "positive" if positive else "negative"}


def tokenizer(texts: list[str], vocab_size: int = 300, max_length: int = 64) -> PreTrainedTokenizerFast:
    wordpiece = Tokenizer(models.WordPiece(unk_token=SPECIAL["unk_token"]))
    wordpiece.normalizer = normalizers.BertNormalizer(lowercase=True)
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL.values()),
                                        show_progress=False)
    wordpiece.train_from_iterator(texts, trainer)
    cls, sep = (wordpiece.token_to_id(SPECIAL[k]) for k in ("cls_token", "sep_token"))
    wordpiece.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return PreTrainedTokenizerFast(tokenizer_object=wordpiece, model_max_length=max_length, **SPECIAL)


def main(out: Path) -> None:
    rng = random.Random(0)
    splits = {name: [review(rng) for _ in range(n)] for name, n in ROWS.items()}
    (out / "data").mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        with open(out / "data" / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(row, sort_keys=True) + "\n" for row in rows)
    tok = tokenizer([row["text"] for row in splits["train"]])
    tok.save_pretrained(out / "model")
    config = BertConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64, pad_token_id=tok.pad_token_id,
                        dtype="float32")
    torch.manual_seed(0)
    BertModel(config).save_pretrained(out / "model")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent)
