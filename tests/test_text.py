"""swap_left_right: whole words only, case and punctuation kept, an involution."""

from __future__ import annotations

import numpy as np
import pytest

from nanodit.data.text import swap_left_right


@pytest.mark.parametrize(
    "text, expected",
    [
        ("a red ball on the left", "a red ball on the right"),
        ("left and right", "right and left"),
        ("Left: a cat. Right: a dog.", "Right: a cat. Left: a dog."),
        ("LEFT side, RIGHT side", "RIGHT side, LEFT side"),
        ("(left), [right]; left! right? left's", "(right), [left]; right! left? right's"),
        ("a left-hand glove", "a right-hand glove"),
        (
            "the leftmost and Rightmost trees, leftwards and rightward",
            "the rightmost and Leftmost trees, rightwards and leftward",
        ),
        ("bright lights, copyright", "bright lights, copyright"),
        ("leftover rice, brightly lit, righteous", "leftover rice, brightly lit, righteous"),
        ("a bright yellow square on the right", "a bright yellow square on the left"),
        ("left_side right2", "left_side right2"),  # joined to word characters: not the word
        ("  left\tright\n", "  right\tleft\n"),
        ("", ""),
        ("no sides here", "no sides here"),
    ],
)
def test_swap_cases(text: str, expected: str) -> None:
    """Whole words swap with their case; everything else is untouched."""
    assert swap_left_right(text) == expected


def test_swap_is_involution_and_counts_swap() -> None:
    """On random texts of side words, fillers and punctuation: swapping twice is the identity, and the
    counts of "left" and "right" trade places while "bright"/"leftover" counts stay."""
    rng = np.random.default_rng(0)
    words = [
        "left",
        "Left",
        "LEFT",
        "right",
        "Right",
        "RIGHT",
        "bright",
        "leftover",
        "a",
        "the",
        ",",
        ".",
        "-",
    ]
    for _ in range(200):
        text = " ".join(rng.choice(words, size=rng.integers(1, 15)))
        once = swap_left_right(text)
        assert swap_left_right(once) == text
        low, low1 = text.lower().split(), once.lower().split()
        assert low1.count("left") == low.count("right") and low1.count("right") == low.count("left")
        assert low1.count("bright") == low.count("bright") and low1.count("leftover") == low.count("leftover")


def test_swap_rejects_non_text() -> None:
    with pytest.raises(TypeError, match="must be a str"):
        swap_left_right(b"left")  # type: ignore[arg-type]
