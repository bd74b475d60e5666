"""The metric task's scorer: 1.0 for the right number, 0.5 for the right order of magnitude, else 0.0.

It always returns a float, so every row has an F1-like score and the NAT-k variants can grade by it.
"""

import math


def same_number(prediction, gold):
    if prediction is None:
        return 0.0
    try:
        value = float(prediction.strip().removesuffix("m").strip())
    except ValueError:
        return 0.0
    target = float(gold)
    if math.isclose(value, target, rel_tol=1e-6):
        return 1.0
    if value > 0 and target > 0 and abs(math.log10(value / target)) < 0.5:
        return 0.5
    return 0.0
