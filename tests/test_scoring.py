"""Scoring: NAT's exact rules (paper mode), the lenient ones (robust mode), HotpotQA EM/F1, NAT-k classes."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nat_ray.core.scoring import (
    NAT_CLASS_SCHEMES,
    Score,
    as_bool_gold,
    canonical_math_gold,
    exact_match,
    extract_math_gold,
    f1,
    format_number,
    math_correct,
    nat_class,
    normalize_answer,
    parse_number,
    score_answer,
    yes_no_correct,
)
from nat_ray.errors import ConfigError

# ----------------------------------------------------------------------------------------------
# Math
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pred", "gold", "paper", "robust"),
    [
        ("18", "#### 18", True, True),  # finish[18]
        ("18.0", "#### 18", False, True),
        ("$18", "#### 18", False, True),
        (" 18", "#### 18", False, True),
        ("18 ", "#### 18", False, True),
        ("18.", "#### 18", False, True),
        ("18 dollars", "#### 18", False, True),
        ("The answer is 18", "#### 18", False, True),
        ("The answer is $18.", "#### 18", False, True),
        ("17", "#### 18", False, False),
        ("", "#### 18", False, False),
        ("eighteen", "#### 18", False, False),
        ("2 * 9 = 18", "#### 18", False, False),  # several numbers: ambiguous
        # gold commas are removed in paper mode, so only the bare number matches
        ("1,800", "#### 1,800", False, True),
        ("1800", "#### 1,800", True, True),
        ("1,800", "#### 1800", False, True),
        ("1,000", "#### 1000", False, True),
        # a full GSM8K rationale as gold
        ("72", "48/2 = <<48/2=24>>24\n48+24 = <<48+24=72>>72\n#### 72", True, True),
        # ASDiv: no "####", the whole string is the gold
        ("9", "9", True, True),
        ("9.00", "9", False, True),
        ("-5", "#### -5", True, True),
        ("3/4", "0.75", False, True),
        ("\\frac{3}{4}", "#### 0.75", False, True),
        ("0.75", "3/4", False, True),
        ("1 1/2", "1.5", False, True),
        ("25%", "25", False, True),
        ("1.8e3", "#### 1800", False, True),
        ("0.3333", "1/3", False, False),  # a rounded answer is not the exact one
    ],
)
def test_math_correct(pred: str, gold: str, paper: bool, robust: bool) -> None:
    assert math_correct(pred, gold, "paper") is paper
    assert math_correct(pred, gold, "robust") is robust


def test_math_correct_default_mode_is_robust_and_unknown_mode_raises() -> None:
    assert math_correct("18.0", "#### 18")
    with pytest.raises(ValueError, match="mode"):
        math_correct("18", "#### 18", "lenient")


def test_math_none_pred_is_wrong() -> None:
    assert not math_correct(None, "#### 18", "paper")
    assert not math_correct(None, "#### 18", "robust")


def test_extract_math_gold_follows_nat() -> None:
    assert extract_math_gold("#### 1,080") == "1080"
    assert extract_math_gold("so 3 + 4 = 7\n#### 7") == "7"
    assert extract_math_gold("9") == "9"
    assert extract_math_gold("####7") == "####7"  # NAT's regex needs the space: whole string kept


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("#### 1,080", "1080"),
        ("a\n#### 39", "39"),
        ("51.0", "51"),
        ("1.20", "1.2"),
        ("-0.5", "-0.5"),
        ("0.125", "0.125"),
        ("3/4", "0.75"),  # a terminating fraction is written as a decimal
        ("2/6", "1/3"),
        (18, "18"),
        (18.0, "18"),
        (0.1, "0.1"),
        ("5 (years old); 15 (years old)", None),
        ("3:30 p.m.", None),
        (True, None),
    ],
)
def test_canonical_math_gold(raw: str | int | float, canonical: str | None) -> None:
    assert canonical_math_gold(raw) == canonical


@given(st.fractions(max_denominator=1000))
def test_format_number_round_trips(value: Fraction) -> None:
    assert parse_number(format_number(value)) == value


@given(st.integers(min_value=-(10**9), max_value=10**9))
def test_integer_answers_match_in_both_modes(n: int) -> None:
    assert math_correct(str(n), f"#### {n}", "paper")
    assert math_correct(f"${n:,}", f"#### {n:,}", "robust")


# ----------------------------------------------------------------------------------------------
# HotpotQA
# ----------------------------------------------------------------------------------------------


def test_normalize_answer() -> None:
    assert normalize_answer("  The  Saimaa, Gesture! ") == "saimaa gesture"
    assert normalize_answer("An apple a day") == "apple day"
    assert normalize_answer("theatre") == "theatre"  # articles only as whole words


def test_exact_match_removes_articles() -> None:
    assert exact_match("The Saimaa Gesture", "Saimaa Gesture")
    assert not exact_match("Saimaa", "Saimaa Gesture")


def test_f1_partial_overlap_by_hand() -> None:
    # pred -> "cat sat on mat" (4 tokens), gold -> "cat on hat" (3); shared: cat, on
    # P = 2/4, R = 2/3, F1 = 2PR / (P + R) = 4/7
    assert f1("the cat sat on the mat", "a cat on a hat") == pytest.approx(4 / 7)


def test_f1_counts_repeated_tokens_as_a_multiset() -> None:
    # pred "new new york" vs gold "new york": shared = min(2,1) + 1 = 2; P = 2/3, R = 1 -> 0.8
    assert f1("new new york", "New York") == pytest.approx(0.8)


def test_f1_yes_no_rule() -> None:
    assert f1("yes", "no") == 0.0
    assert f1("no way", "no") == 0.0  # token overlap would give 2/3
    assert f1("yes it is", "yes") == 0.0
    assert f1("noanswer", "no answer") == 0.0
    assert f1("Yes.", "yes") == 1.0


def test_f1_of_empty_answers_is_zero() -> None:
    assert f1("", "") == 0.0
    assert f1("the", "a") == 0.0  # both normalise to ""


_WORDS = st.sampled_from(
    ["the", "a", "an", "cat", "Cat", "yes", "no", "noanswer", "new", "york", "1", ",", "."]
)
_ANSWERS = st.lists(_WORDS, max_size=6).map(" ".join) | st.text(max_size=20)


@settings(max_examples=60)
@given(_ANSWERS, _ANSWERS)
def test_f1_is_symmetric_and_bounded(a: str, b: str) -> None:
    assert f1(a, b) == f1(b, a)
    assert 0.0 <= f1(a, b) <= 1.0


@settings(max_examples=60)
@given(_ANSWERS, _ANSWERS)
def test_exact_match_implies_full_f1(a: str, b: str) -> None:
    if exact_match(a, b) and normalize_answer(a):
        assert f1(a, b) == 1.0


# ----------------------------------------------------------------------------------------------
# StrategyQA
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pred", "gold", "paper", "robust"),
    [
        ("Yes", True, True, True),
        ("yes", True, True, True),
        ("YES", True, True, True),
        ("No", False, True, True),
        ("No", True, False, False),
        ("Yes.", True, False, True),
        (" yes", True, False, True),
        ("yes, because the sky is blue", True, False, True),
        ("**No**", False, False, True),
        ("Unclear", True, False, False),
        ("Unclear", False, False, False),
        ("Not sure", False, False, False),  # "Not" is not "No"
        ("", False, False, False),
        (None, True, False, False),
    ],
)
def test_yes_no_correct(pred: str | None, gold: bool, paper: bool, robust: bool) -> None:
    assert yes_no_correct(pred, gold, "paper") is paper
    assert yes_no_correct(pred, gold, "robust") is robust


def test_yes_no_gold_may_be_text() -> None:
    assert as_bool_gold("yes") is True and as_bool_gold(" No ") is False and as_bool_gold(False) is False
    assert yes_no_correct("Yes", "yes")
    with pytest.raises(ValueError):
        as_bool_gold("maybe")


# ----------------------------------------------------------------------------------------------
# NAT-k classes
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("score", "four", "three", "binary"),
    [
        (0.0, "totally_incorrect", "incorrect", "incorrect"),
        (1e-9, "mostly_incorrect", "partially_correct", "incorrect"),
        (0.39999, "mostly_incorrect", "partially_correct", "incorrect"),
        (0.4, "mostly_correct", "partially_correct", "incorrect"),
        (0.99, "mostly_correct", "partially_correct", "incorrect"),
        (1.0, "correct", "correct", "correct"),
    ],
)
def test_nat_class_boundaries(score: float, four: str, three: str, binary: str) -> None:
    assert nat_class(score, "four-class") == four
    assert nat_class(score, "three-class") == three
    assert nat_class(score, "binary") == binary


def test_nat_class_schemes_list_classes_worst_first() -> None:
    assert NAT_CLASS_SCHEMES["four-class"] == (
        "totally_incorrect",
        "mostly_incorrect",
        "mostly_correct",
        "correct",
    )
    assert NAT_CLASS_SCHEMES["three-class"] == ("incorrect", "partially_correct", "correct")
    assert NAT_CLASS_SCHEMES["binary"] == ("incorrect", "correct")


def test_nat_class_rejects_bad_input() -> None:
    with pytest.raises(ConfigError, match="scheme"):
        nat_class(0.5, "five-class")
    for bad in (-0.1, 1.1, math.nan):
        with pytest.raises(ValueError, match="f1"):
            nat_class(bad, "four-class")


@given(st.floats(min_value=0.0, max_value=1.0))
def test_nat_class_is_monotone_in_f1(score: float) -> None:
    for scheme, classes in NAT_CLASS_SCHEMES.items():
        lower = classes.index(nat_class(score / 2, scheme))
        assert lower <= classes.index(nat_class(score, scheme))


# ----------------------------------------------------------------------------------------------
# score_answer
# ----------------------------------------------------------------------------------------------


def test_score_answer_per_family() -> None:
    assert score_answer("math", "18.0", "#### 18") == Score(correct_paper=False, correct_robust=True)
    assert score_answer("strategyqa", "Yes.", True) == Score(correct_paper=False, correct_robust=True)
    hotpot = score_answer("hotpotqa", "The Saimaa Gesture", "Saimaa Gesture")
    assert hotpot == Score(correct_paper=True, correct_robust=True, em=True, f1=1.0)
    partial = score_answer("hotpotqa", "the cat sat on the mat", "a cat on a hat")
    assert not partial.correct_paper and partial.em is False and partial.f1 == pytest.approx(4 / 7)


def test_score_answer_unfinished_episode() -> None:
    assert score_answer("math", None, "#### 18") == Score(False, False, None, None)
    assert score_answer("strategyqa", None, False) == Score(False, False, None, None)
    assert score_answer("hotpotqa", None, "yes") == Score(False, False, em=False, f1=0.0)


def test_score_answer_unknown_family() -> None:
    with pytest.raises(ConfigError, match="family"):
        score_answer("chess", "e4", "e4")
