"""Rows of the token-labelling and extractive-QA tasks: what makes one unusable (said by data.load_one with the row's
number, before any rank starts), and character spans turned into words with BIO tags, the one form training uses."""

from __future__ import annotations

import re

WORD = re.compile(r"\w+|[^\w\s]")  # a word or one punctuation mark: "Paris." is two words, as in CoNLL data


def tags_problem(row: dict, labels: list[str]) -> str | None:
    """tokens + tags rows: a tag per word, each a name of head.labels or its id."""
    tokens, tags = row["tokens"], row["tags"]
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) and t.strip() for t in tokens):
        return "'tokens' must be a non-empty list of words (non-empty strings)"
    if not isinstance(tags, list) or len(tags) != len(tokens):
        count = len(tags) if isinstance(tags, list) else type(tags).__name__
        return f"has {len(tokens)} tokens but {count} tags; give one tag per word"
    for number, tag in enumerate(tags, 1):
        if not _is_label(tag, labels):
            return (f"tag {number} ({tokens[number - 1]!r}) is {tag!r}; it must be one of head.labels {labels} or "
                    f"an id from 0 to {len(labels) - 1}")
    return None


def spans_problem(row: dict, labels: list[str]) -> str | None:
    """text + spans rows: each span {start, end, label} covers whole words of the text, with B-/I- tags of its label
    in head.labels, and overlaps no other span."""
    text, spans = row["text"], row["spans"]
    if not isinstance(text, str) or not text.strip():
        return "'text' is empty or not a string"
    if not isinstance(spans, list):
        return f"'spans' must be a list of {{start, end, label}}, got {type(spans).__name__}"
    starts, ends = ({m.start() for m in WORD.finditer(text)}, {m.end() for m in WORD.finditer(text)})
    taken = 0
    at = lambda s: s["start"] if isinstance(s, dict) and isinstance(s.get("start"), int) else -1  # noqa: E731
    for number, span in enumerate(sorted(spans, key=at), 1):
        where = f"span {number}"
        if not isinstance(span, dict) or not all(isinstance(span.get(k), int) for k in ("start", "end")):
            return f"{where} is {span!r}; a span is {{start, end, label}} with character offsets"
        start, end, label = span["start"], span["end"], span.get("label")
        if not 0 <= start < end <= len(text):
            return (f"{where} ({start}..{end}) lies outside the text, which has {len(text)} characters; offsets "
                    "count characters from 0, end exclusive")
        if start not in starts or end not in ends:
            return f"{where} ({start}..{end}, {text[start:end]!r}) cuts a word; a span covers whole words"
        if start < taken:
            return f"{where} ({start}..{end}) overlaps the span before it"
        if f"B-{label}" not in labels or f"I-{label}" not in labels:
            return f"{where} has label {label!r}; head.labels must hold B-{label} and I-{label} (it is {labels})"
        taken = end
    return None


def to_tags(row: dict) -> dict:
    """A checked text + spans row as tokens + tags: B- on a span's first word, I- on the rest, O outside."""
    words = list(WORD.finditer(row["text"]))
    tags = ["O"] * len(words)
    for span in row["spans"]:
        inside = [i for i, w in enumerate(words) if span["start"] <= w.start() and w.end() <= span["end"]]
        tags[inside[0]] = f"B-{span['label']}"
        for i in inside[1:]:
            tags[i] = f"I-{span['label']}"
    return {"tokens": [w.group() for w in words], "tags": tags}


def squad_problem(row: dict) -> str | None:
    """question, context, answers rows as SQuAD gives them: answers = {text: [...], answer_start: [...]}, each answer
    found in the context at its start."""
    for column in ("question", "context"):
        if not isinstance(row[column], str) or not row[column].strip():
            return f"'{column}' is empty or not a string"
    answers, context = row["answers"], row["context"]
    texts = answers.get("text") if isinstance(answers, dict) else None
    starts = answers.get("answer_start") if isinstance(answers, dict) else None
    if not isinstance(texts, list) or not isinstance(starts, list) or len(texts) != len(starts):
        return "'answers' must be {text: [...], answer_start: [...]} with a start for every text, as in SQuAD"
    if not texts:
        return "has no answer; unanswerable questions (SQuAD 2) are not supported"
    for number, (text, start) in enumerate(zip(texts, starts, strict=True), 1):
        if not isinstance(text, str) or not text or not isinstance(start, int):
            return f"answer {number} is {text!r} at {start!r}; an answer is a non-empty text and its start"
        if context[start : start + len(text)] != text:
            found = context.find(text)
            hint = f"; it is at {found}" if found >= 0 else "; the context does not contain it"
            return (f"answer {number} {text!r} is not at character {start} of the context (which reads "
                    f"{context[start : start + len(text)]!r} there){hint}")
    return None


def _is_label(value, labels: list[str]) -> bool:
    if isinstance(value, str):
        return value in labels
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(labels)
