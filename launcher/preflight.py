"""Pre-flight: what the ranks will load first (data rows, tokenizer), checked in the launching process, so bad data
is reported before any rank is started or any job waits in a queue."""

from __future__ import annotations

from launcher.schema import Recipe


def check(recipe: Recipe, where: str) -> None:
    """Raise RecipeError (one line naming the file and row or key) for data or tokenizer problems."""
