"""Caption helpers shared by real and synthetic data.

    swap_left_right("A red ball on the LEFT, bright light at right.")
    # -> "A red ball on the RIGHT, bright light at left."

The horizontal-flip augmentation mirrors the image, so a caption that says where things are must
mirror too. The swap works on whole words only: "bright", "leftover", "copyright" are untouched,
while "left"/"right" and the directional compounds "leftmost"/"rightmost" and
"leftward(s)"/"rightward(s)" swap, keeping their case ("Left" -> "Right", "LEFT" -> "RIGHT") and every
character around them. It cannot tell the verb "left" ("she left") from the direction; captions
with it are rare and the swap is then wrong, a known limit of any word-level rule.
"""

from __future__ import annotations

import re

# stem left|right, then an optional directional suffix; \b on both ends keeps "bright", "leftover" intact
_LEFT_RIGHT = re.compile(r"\b(left|right)(most|wards?)?\b", re.IGNORECASE)
_OTHER = {"left": "right", "right": "left"}


def _match_case(word: str, like: str) -> str:
    """``word`` (lower case) spelled in the case pattern of ``like``: UPPER, Title or lower."""
    if like.isupper():
        return word.upper()
    if like[0].isupper():
        return word[0].upper() + word[1:]
    return word


def _swap(m: re.Match) -> str:
    stem, suffix = m.group(1), m.group(2) or ""
    return _match_case(_OTHER[stem.lower()], stem) + suffix


def swap_left_right(text: str) -> str:
    """``text`` with every whole word "left" and "right" (and leftmost/leftward(s) and their mirrors)
    swapped, case kept; everything else, punctuation and spacing included, is unchanged.

    An involution wherever those words are lower, Title or UPPER case:
    ``swap_left_right(swap_left_right(t)) == t``; odd mixed case ("lEFT") comes out lower case.
    """
    if not isinstance(text, str):
        raise TypeError(f"swap_left_right: text must be a str, got {type(text).__name__}")
    return _LEFT_RIGHT.sub(_swap, text)
