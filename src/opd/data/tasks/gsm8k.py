"""GSM8K-style answers: a worked solution whose last line is `#### <number>`.

A completion's final answer is taken, in this order, from:
1. the last `#### N` line;
2. else the last `\\boxed{N}`;
3. else the last number in the text.
Numbers compare as values, so `1,000`, `$1000` and `1000.0` are equal.
"""

from __future__ import annotations

import re
from fractions import Fraction

_NUMBER = r"-?\$?\s*\d[\d,]*(?:\.\d+)?"
_HASH_LINE = re.compile(r"####\s*(" + _NUMBER + ")")
_BOXED = re.compile(r"\\boxed\{\s*(" + _NUMBER + r")\s*\}")
_ANY_NUMBER = re.compile(_NUMBER)


def parse_number(text: str) -> Fraction | None:
    cleaned = text.replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    try:
        return Fraction(cleaned)
    except (ValueError, ZeroDivisionError):
        return None


def gold_answer(answer: str) -> Fraction | None:
    """The number on the last `#### N` line of a reference answer, or None if it has none."""
    matches = _HASH_LINE.findall(answer)
    return parse_number(matches[-1]) if matches else None


def extract_answer(completion: str) -> Fraction | None:
    for pattern in (_HASH_LINE, _BOXED, _ANY_NUMBER):
        matches = pattern.findall(completion)
        if matches:
            return parse_number(matches[-1])
    return None


def is_correct(completion: str, reference: str) -> bool | None:
    """True/False when the reference carries a `#### N` answer; None when it is not checkable."""
    gold = gold_answer(reference)
    if gold is None:
        return None
    predicted = extract_answer(completion)
    return predicted is not None and predicted == gold
