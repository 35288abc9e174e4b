"""Generation scoring on plain strings: the normaliser and the two match modes."""

from __future__ import annotations

import math

import pytest

from dpeft.train.generate import is_correct, normalise, perplexity, score_answers


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Fresh", "fresh"),
        ("  Fresh.  ", "fresh"),
        ("ROTTEN!!!", "rotten"),
        ("fresh\nBecause the acting is great.", "fresh"),
        ("\n\n  Fresh  \nmore", "fresh"),
        ("New   York\tCity?", "new york city"),
        ("", ""),
        ("...", ""),
        ("U.S.A.", "u.s.a"),
    ],
)
def test_normalise(text: str, expected: str) -> None:
    assert normalise(text) == expected


def test_normalise_whole_answer() -> None:
    assert normalise("Answer:\nFresh.", first_line=False) == "answer: fresh"


def test_exact_match() -> None:
    assert is_correct(" Fresh.", "fresh")
    assert is_correct("fresh\nIt is a good film", "Fresh")
    assert not is_correct("It is fresh.", "fresh")  # exact: nothing else on the first line
    assert not is_correct("rotten", "fresh")
    assert not is_correct("", "")  # an empty reference never matches


def test_contains_match() -> None:
    assert is_correct("I think it is Fresh!", "fresh", "contains")
    assert is_correct("Answer:\nfresh", "fresh.", "contains")  # any line of the answer
    assert not is_correct("rotten", "fresh", "contains")
    assert not is_correct("anything", "  ", "contains")
    with pytest.raises(ValueError, match="unknown match"):
        is_correct("a", "a", "fuzzy")


def test_score_answers_counts_and_samples() -> None:
    score = score_answers(
        ["p1", "p2", "p3", "p4"], ["fresh", "rotten", "fresh", "x"], ["Fresh.", "fresh", "fresh", ""], "exact", samples=2
    )
    assert score.metrics == {"gen_accuracy": 0.5, "gen_examples": 4}
    assert score.samples == [
        {"prompt": "p1", "reference": "fresh", "answer": "Fresh.", "correct": True},
        {"prompt": "p2", "reference": "rotten", "answer": "fresh", "correct": False},
    ]
    assert score_answers([], [], [], "contains").metrics == {"gen_accuracy": 0.0, "gen_examples": 0}


def test_perplexity() -> None:
    assert perplexity(0.0) == 1.0
    assert perplexity(math.log(7.0)) == pytest.approx(7.0)
    assert perplexity(1e6) == math.inf
