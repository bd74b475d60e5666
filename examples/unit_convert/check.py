"""The example task's own scorer: is the agent's final answer the right number (to 0.1%)?

A scorer is called as ``scorer(prediction, gold)``: ``prediction`` is the text the agent passed to
``finish[...]`` (None when it never finished), ``gold`` the file's answer. It returns a bool, or a
float in [0, 1] for partial credit.
"""

from __future__ import annotations

import re

_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")


def same_number(prediction: str | None, gold: str) -> bool:
    """True when the first number in ``prediction`` is within 0.1% of ``gold``."""
    if prediction is None:
        return False
    match = _NUMBER.search(prediction)
    if match is None:
        return False
    value, expected = float(match[0].replace(",", "")), float(gold)
    return abs(value - expected) <= 1e-3 * max(1.0, abs(expected))
