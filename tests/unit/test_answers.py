"""Answer-level scores against hand-worked values."""

from __future__ import annotations

import pytest

from launcher import answers


@pytest.mark.parametrize(("generated", "reference", "same"), [
    ("Paris.", "paris", True),
    ("  The  answer is   42 ", "the answer is 42", True),
    ("-4", "4", False),  # a sign is part of the answer
    ("3.5", "35", False),
    ("42!", "42", True),
    ("", "", True),
    ("", "x", False),
])
def test_exact_match_is_light(generated, reference, same):
    assert (answers.normalize(generated) == answers.normalize(reference)) is same
    assert answers.scores([(generated, reference)])["exact_match"] == float(same)


def test_token_f1():
    # 2 of 3 generated words are in the 4-word reference: precision 2/3, recall 2/4, F1 = 2pr/(p+r) = 4/7
    assert answers.f1("the cat sat", "a cat sat down") == pytest.approx(4 / 7)
    assert answers.f1("cat cat", "cat") == pytest.approx(2 * 0.5 * 1 / 1.5)  # a repeated word counts once
    assert answers.f1("dog", "cat") == 0.0
    assert answers.f1("", "") == 1.0 and answers.f1("", "cat") == 0.0


def test_scores_are_means_over_the_answers():
    got = answers.scores([("a b", "a b"), ("a", "a b"), ("c", "d")])
    assert got["answered"] == 3
    assert got["exact_match"] == pytest.approx(1 / 3)
    assert got["f1"] == pytest.approx((1 + 2 / 3 + 0) / 3)  # "a" vs "a b": precision 1, recall 1/2
    assert answers.scores([]) == {}
