"""Answer-level scores: a model's greedy answers to prompts, against the references.

Exact match after light normalisation (case, surrounding whitespace and a final full stop, runs of whitespace), and
token F1 over the normalised words (SQuAD's overlap F1). Lighter than SQuAD's normalisation on purpose: it keeps
punctuation and articles, so "-4" is not "4" and "3.5" is not "35".
"""

from __future__ import annotations

from collections import Counter

ENDINGS = ".!?。"


def normalize(text: str) -> str:
    return " ".join(text.casefold().split()).rstrip(ENDINGS).strip()


def f1(generated: str, reference: str, normal=normalize) -> float:
    got, want = normal(generated).split(), normal(reference).split()
    if not got or not want:
        return float(got == want)
    common = sum((Counter(got) & Counter(want)).values())
    if not common:
        return 0.0
    precision, recall = common / len(got), common / len(want)
    return 2 * precision * recall / (precision + recall)


def scores(pairs: list[tuple[str, str]]) -> dict:
    """pairs: (generated, reference). Means over the pairs."""
    if not pairs:
        return {}
    exact = sum(normalize(g) == normalize(r) for g, r in pairs)
    return {"exact_match": exact / len(pairs), "f1": sum(f1(g, r) for g, r in pairs) / len(pairs),
            "answered": len(pairs)}


def generate(model, tokenizer, prompts: list[list[int]], batch_size: int, max_new_tokens: int,
             step=lambda: None) -> list[str]:
    """Greedy answers to prompts (token ids), batch_size at a time, left-padded so every row continues from the
    batch's last position; each stops at the model's end of turn (its generation config's EOS ids). step() runs
    after each batch (a progress bar)."""
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    answers = []
    try:
        for start in range(0, len(prompts), batch_size):
            encoded = tokenizer.pad({"input_ids": prompts[start : start + batch_size]}, return_tensors="pt")
            encoded = encoded.to(model.device)
            out = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            width = encoded["input_ids"].shape[1]
            answers += [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out]
            step()
    finally:
        tokenizer.padding_side = side
    return answers


def scores_across_ranks(model, tokenizer, asked: list[tuple[list[int], str, str]], batch_size: int,
                        max_new_tokens: int) -> dict:
    """Exact match and token F1 of the answers to ASKED ((prompt ids, prompt, reference), the same list on every
    rank): each rank answers its share and the sums are added up across ranks. Every rank makes the same number of
    generate calls, padding its share with repeats that are not scored: under ZeRO-3 each forward gathers the
    parameters from all ranks (generate's synced_gpus), so a rank that stopped early would leave the others waiting."""
    import torch
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    share = asked[rank::world]
    padded = share + [asked[0]] * (-(-len(asked) // world) - len(share))
    texts = generate(model, tokenizer, [ids for ids, _, _ in padded], batch_size, max_new_tokens)
    pairs = [(text, reference) for text, (_, _, reference) in zip(texts[: len(share)], share, strict=True)]
    totals = torch.tensor([sum(normalize(g) == normalize(r) for g, r in pairs), sum(f1(g, r) for g, r in pairs),
                           len(pairs)], dtype=torch.float64, device=model.device)
    if distributed:
        dist.all_reduce(totals)
    exact, overlap, count = totals.tolist()
    return {"exact_match": exact / count, "f1": overlap / count}
