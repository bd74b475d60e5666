"""Preference data from NAT's labelled trajectories: DPO's pairs and KTO's class weights. Pure Python.

NAT keeps every trajectory with a label (solved or not). Preference objectives read the same rows
another way: DPO (as ETO uses it) wants a positive and a negative trajectory *of the same question*;
KTO wants the unpaired positives (desirable) and negatives (undesirable) with weights that balance
the two classes. Both are decided here, seeded and counted, so a run can say how its pairs were drawn.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from nat_ray.core.nat_data import get_variant
from nat_ray.errors import ConfigError

Row = TypeVar("Row")

# train.objective: NAT's supervised loss, or a preference loss on the same labelled trajectories.
OBJECTIVES = ("sft", "kto", "dpo")
# KTO and DPO train and ask with the plain prompt (NUT's: no marker); the preference is in the loss.
PLAIN_VARIANT = "nut"
# KTO (Ethayarajh et al., 2024, section 4): keep lambda_D * n_D / (lambda_U * n_U) in [1, 4/3].
KTO_RATIO_LOW = 1.0
KTO_RATIO_HIGH = 4.0 / 3.0


@dataclass(frozen=True)
class PairReport:
    """How DPO pairs were drawn from labelled rows.

    Attributes:
        questions: questions with at least one row.
        paired_questions: questions with at least one positive and one negative.
        pairs: pairs drawn: per question, as many as the smaller class has rows.
        unused_positives / unused_negatives: rows of the larger class left out (or of a question
            without the other class).
        seed: the seed that shuffled each question's rows before they were zipped.
    """

    questions: int
    paired_questions: int
    pairs: int
    unused_positives: int
    unused_negatives: int
    seed: int


def draw_pairs(
    rows: Sequence[Row],
    question: Callable[[Row], Hashable],
    positive: Callable[[Row], bool],
    seed: int,
) -> tuple[list[tuple[Row, Row]], PairReport]:
    """``(positive, negative)`` pairs of the same question, and how they were drawn.

    Each question's positives and negatives are shuffled with a generator seeded by ``seed`` and the
    question's order of first appearance, then zipped: when the counts differ, the extra rows of the
    larger class are not used (a row is in at most one pair). The same rows and seed give the same
    pairs.
    """
    by_question: dict[Hashable, tuple[list[Row], list[Row]]] = defaultdict(lambda: ([], []))
    for row in rows:
        by_question[question(row)][0 if positive(row) else 1].append(row)
    pairs: list[tuple[Row, Row]] = []
    paired = unused_pos = unused_neg = 0
    for index, (pos, neg) in enumerate(by_question.values()):
        rng = random.Random(seed * 1_000_003 + index)
        pos, neg = list(pos), list(neg)
        rng.shuffle(pos)
        rng.shuffle(neg)
        n = min(len(pos), len(neg))
        paired += n > 0
        pairs.extend(zip(pos[:n], neg[:n]))
        unused_pos += len(pos) - n
        unused_neg += len(neg) - n
    report = PairReport(len(by_question), paired, len(pairs), unused_pos, unused_neg, seed)
    return pairs, report


def check_objective(objective: str, variant) -> None:
    """Refuse a preference objective on a data recipe without negatives (it has nothing to prefer against).

    Args:
        variant: a :class:`nat_ray.core.nat_data.Variant`.

    Raises:
        ConfigError: ``objective`` is kto or dpo and ``variant`` selects positives only.
    """
    if objective != "sft" and not variant.negatives:
        raise ConfigError(
            f"train.objective={objective} learns from positives and negatives, but variant {variant.name!r} "
            "selects positives only; choose a variant with negatives (nat, nut, ...)"
        )


def split_run_variant(spec: str) -> tuple[str, str]:
    """A pipeline variant ``recipe[+objective]`` (``nat``, ``nat+kto``, ``nut+dpo``) as ``(recipe, objective)``.

    Raises:
        ConfigError: an unknown objective, or one that the recipe cannot feed (no negatives).
    """
    recipe, _, objective = spec.partition("+")
    objective = objective or "sft"
    if objective not in OBJECTIVES:
        raise ConfigError(
            f"variant {spec!r}: unknown objective {objective!r}; choose one of {list(OBJECTIVES)}"
        )
    check_objective(objective, get_variant(recipe))
    return recipe, objective


def inference_template(recipe: str, objective: str) -> str:
    """The prompt template a model trained with ``recipe`` and ``objective`` is asked with (zero-shot)."""
    return get_variant(recipe if objective == "sft" else PLAIN_VARIANT).template


def kto_weights(desirable: int, undesirable: int) -> tuple[float, float]:
    """``(lambda_D, lambda_U)`` for ``desirable`` positives and ``undesirable`` negatives.

    The KTO paper keeps ``lambda_D * n_D / (lambda_U * n_U)`` between 1 and 4/3: with fewer
    positives than negatives the positives weigh more (the product is 1), with more than 4/3 as many
    they weigh less (the product is 4/3), in between both weigh 1. ``lambda_U`` stays 1.

    Raises:
        ValueError: a class with no example (KTO needs both).
    """
    if desirable <= 0 or undesirable <= 0:
        raise ValueError(f"KTO needs desirable and undesirable examples; got {desirable} and {undesirable}")
    ratio = desirable / undesirable
    if ratio < KTO_RATIO_LOW:
        return KTO_RATIO_LOW / ratio, 1.0
    if ratio > KTO_RATIO_HIGH:
        return KTO_RATIO_HIGH / ratio, 1.0
    return 1.0, 1.0
