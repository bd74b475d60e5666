"""Answer scoring for the three task families, in two modes.

``paper`` mode reproduces the NAT repository's verdicts exactly (spec §2.3), quirks included: a math
answer is right only when the raw ``finish[...]`` argument equals the gold number as a string, so
``18.0``, ``$18`` and `` 18`` are wrong for 18, and a StrategyQA answer must be exactly ``yes``/``no``
up to case. ``robust`` mode is what a reader would call correct: numbers compare by value after
stripping currency, thousands separators, units and surrounding words, and yes/no answers may carry
punctuation or an explanation. Reports carry both (:class:`Score`), so a run can be compared with the
paper and still be judged fairly.

HotpotQA uses the official HotpotQA/SQuAD normalisation and token F1. The NAT-k classes that pick the
training prompt of a HotpotQA trajectory by its F1 live here too (:func:`nat_class`); the prompt
strings themselves belong to the prompt module.

Everything here is pure: no I/O, no randomness.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from fractions import Fraction

from nat_ray.errors import ConfigError

SCORING_MODES = ("paper", "robust")
FAMILIES = ("math", "hotpotqa", "strategyqa")

# ---------------------------------------------------------------------------------------------
# Math
# ---------------------------------------------------------------------------------------------

# NAT's gold extraction (api/tools/math/utils.py): the number after "#### ", commas dropped.
_NAT_GOLD_RE = re.compile(r"#### (\-?[0-9\.\,]+)")
# Looser form for robust mode and for loading golds: anything after the last "####".
_HASHES_RE = re.compile(r"####\s*(.*)\s*$", re.DOTALL)

_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
# One number, optionally a fraction a/b; the longest match wins so "3/4" is one token, not two.
_NUMBER_TOKEN_RE = re.compile(rf"{_NUMBER}(?:\s*/\s*{_NUMBER})?")
_WHOLE_NUMBER_RE = re.compile(rf"\s*({_NUMBER})(?:\s*/\s*({_NUMBER}))?\s*")
# A thousands separator: a comma between a digit and exactly three digits ("1,800", "1,000,000").
_THOUSANDS_COMMA_RE = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_LATEX_FRAC_RE = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_MIXED_NUMBER_RE = re.compile(r"(?<![\d.])(\d+)\s+(\d+)\s*/\s*(\d+)(?![\d.])")

# Robust comparisons accept a relative error this small: it absorbs float formatting ("0.30000000000000004")
# without accepting a genuinely rounded answer.
_REL_TOL = Fraction(1, 10**6)


def extract_math_gold(gold: str) -> str:
    """NAT's gold extraction: the number after ``#### `` with commas removed, else the whole string.

    Args:
        gold: a raw gold answer: ``"#### 1,080"``, a full GSM8K rationale ending in ``#### N``, or a
            bare number like ASDiv's ``"9"``.

    Returns:
        The string NAT compares the prediction with, e.g. ``"1080"``; the input unchanged when it holds
        no ``#### N``.
    """
    match = _NAT_GOLD_RE.search(gold)
    return match.group(1).replace(",", "") if match else gold


def _parse_exact(number: str, denominator: str | None = None) -> Fraction | None:
    """The exact value of ``number`` (or ``number / denominator``); None if undefined or not finite."""
    try:
        value = Fraction(Decimal(number))
        if denominator is not None:
            den = Fraction(Decimal(denominator))
            if den == 0:
                return None
            value /= den
    except (InvalidOperation, ValueError, OverflowError):
        return None
    return value


def _exponent_is_sane(text: str) -> bool:
    # "1e999999999" would make Fraction build an enormous integer; no real answer looks like that.
    return all(abs(int(e)) <= 100 for e in re.findall(r"[eE]([-+]?\d+)", text))


def parse_number(text: str) -> Fraction | None:
    """The single number in a free-form answer, exactly, or None when there is none or several.

    Strips whitespace, ``$``, ``%``, thousands separators and a trailing full stop, reads LaTeX
    ``\\frac{a}{b}`` and mixed numbers (``1 1/2``), and ignores surrounding words and units, so
    ``"The answer is $1,800."``, ``"18 dollars"`` and ``"3/4"`` all parse. Several different numbers
    (``"2 * 9 = 18"``) are ambiguous and give None; the same number repeated is fine.

    Args:
        text: the answer text.

    Returns:
        The value as a :class:`fractions.Fraction`, or None.
    """
    text = text.replace("\u2212", "-").replace("$", " ").replace("%", " ")
    text = _LATEX_FRAC_RE.sub(r" \1/\2 ", text)
    text = _THOUSANDS_COMMA_RE.sub("", text)
    text = _MIXED_NUMBER_RE.sub(lambda m: f" {int(m[1]) * int(m[3]) + int(m[2])}/{m[3]} ", text)
    if not _exponent_is_sane(text):
        return None
    values = set()
    for token in _NUMBER_TOKEN_RE.findall(text):
        numerator, _, denominator = token.partition("/")
        value = _parse_exact(numerator.strip().rstrip("."), denominator.strip().rstrip(".") or None)
        if value is None:
            return None
        values.add(value)
    return values.pop() if len(values) == 1 else None


def parse_gold_number(text: str) -> Fraction | None:
    """A gold answer's value: the text after ``####`` if any, thousands commas dropped, read exactly.

    Stricter than :func:`parse_number`: the whole remaining text must be one number or fraction
    (an optional leading ``$`` or trailing ``%`` is allowed), so a malformed gold is noticed.
    """
    match = _HASHES_RE.search(text)
    body = match.group(1) if match else text
    body = _THOUSANDS_COMMA_RE.sub("", body.strip().replace("\u2212", "-"))
    body = body.removeprefix("$").removesuffix("%")
    whole = _WHOLE_NUMBER_RE.fullmatch(body)
    if whole is None or not _exponent_is_sane(body):
        return None
    return _parse_exact(whole.group(1), whole.group(2))


def format_number(value: Fraction) -> str:
    """Canonical text of a number: ``51``, ``-3``, ``1.2``, ``0.125``; ``1/3`` when not a finite decimal."""
    if value.denominator == 1:
        return str(value.numerator)
    den = value.denominator
    for prime in (2, 5):
        while den % prime == 0:
            den //= prime
    if den != 1:
        return f"{value.numerator}/{value.denominator}"
    # A terminating decimal: scale by 10^k until integral, then place the point.
    k = 0
    scaled = value
    while scaled.denominator != 1:
        scaled *= 10
        k += 1
    digits = str(abs(scaled.numerator)).rjust(k + 1, "0")
    sign = "-" if value < 0 else ""
    return f"{sign}{digits[:-k]}.{digits[-k:]}"


def canonical_math_gold(raw: str | int | float) -> str | None:
    """Normalise a raw math gold to its canonical number string, or None if it is not one number.

    ``"#### 1,080"`` → ``"1080"``; a full GSM8K rationale → its final number; ``"51.0"`` → ``"51"``;
    ``18`` → ``"18"``; ``"3/4"`` → ``"0.75"``; ``"2/6"`` → ``"1/3"``;
    ``"5 (years old); 15 (years old)"`` → None.
    """
    if isinstance(raw, bool):
        return None
    if isinstance(raw, int):
        return str(raw)
    if isinstance(raw, float):
        if not math.isfinite(raw):
            return None
        return format_number(Fraction(Decimal(repr(raw))))
    value = parse_gold_number(raw)
    return None if value is None else format_number(value)


def math_correct(pred: str | None, gold: str, mode: str = "robust") -> bool:
    """Whether a math answer is right.

    Args:
        pred: the raw ``finish[...]`` argument, unstripped; None when the episode never finished.
        gold: the raw gold answer (``"#### 18"``, a GSM8K rationale, or a bare number ``"18"``).
        mode: ``"paper"``: NAT's rule, ``pred == extract_math_gold(gold)`` as exact strings.
            ``"robust"``: both sides read as numbers (:func:`parse_number`, :func:`parse_gold_number`)
            and compared exactly up to a relative error of 1e-6; if the gold is not a number, the
            stripped, lower-cased strings are compared.

    Raises:
        ConfigError: (a ValueError) for an unknown mode.
    """
    if mode not in SCORING_MODES:
        raise ConfigError(f"math scoring mode must be one of {SCORING_MODES}, got {mode!r}")
    if pred is None:
        return False
    if mode == "paper":
        return pred == extract_math_gold(gold)
    gold_value = parse_gold_number(gold)
    if gold_value is None:
        match = _HASHES_RE.search(gold)
        gold_text = match.group(1) if match else gold
        return pred.strip().lower() == gold_text.strip().lower()
    pred_value = parse_number(pred)
    if pred_value is None:
        return False
    return abs(pred_value - gold_value) <= _REL_TOL * max(1, abs(gold_value))


# ---------------------------------------------------------------------------------------------
# HotpotQA
# ---------------------------------------------------------------------------------------------

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES_RE = re.compile(r"\b(a|an|the)\b")
_SPECIAL_ANSWERS = ("yes", "no", "noanswer")


def normalize_answer(s: str) -> str:
    """HotpotQA/SQuAD normalisation: lower-case, drop ASCII punctuation and articles, collapse spaces."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCTUATION)
    s = _ARTICLES_RE.sub(" ", s)
    return " ".join(s.split())


def exact_match(pred: str, gold: str) -> bool:
    """Whether the two answers are equal after :func:`normalize_answer`."""
    return normalize_answer(pred) == normalize_answer(gold)


def f1(pred: str, gold: str) -> float:
    """HotpotQA token F1 of two answers, in [0, 1].

    Both are normalised and split on whitespace; F1 is the harmonic mean of precision and recall over
    the multiset of shared tokens. As in the official script, when either side is ``yes``, ``no`` or
    ``noanswer`` and the two differ, F1 is 0; two empty answers also score 0.
    """
    p, g = normalize_answer(pred), normalize_answer(gold)
    if p != g and (p in _SPECIAL_ANSWERS or g in _SPECIAL_ANSWERS):
        return 0.0
    p_tokens, g_tokens = p.split(), g.split()
    shared = sum((Counter(p_tokens) & Counter(g_tokens)).values())
    if shared == 0:
        return 0.0
    precision = shared / len(p_tokens)
    recall = shared / len(g_tokens)
    return 2 * precision * recall / (precision + recall)


# ---------------------------------------------------------------------------------------------
# StrategyQA
# ---------------------------------------------------------------------------------------------

_LEADING_YES_NO_RE = re.compile(r"^[\W_]*(yes|no|true|false)\b", re.IGNORECASE)
_BOOL_WORDS = {"yes": True, "true": True, "no": False, "false": False}


def as_bool_gold(value: bool | str) -> bool:
    """A yes/no gold as a bool: ``True``/``False`` or the strings yes/no/true/false (any case).

    Raises:
        ValueError: for anything else.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:
        return _BOOL_WORDS[value.strip().lower()]
    raise ValueError(f"a yes/no answer must be a bool or one of yes/no/true/false, got {value!r}")


def yes_no_correct(pred: str | None, gold: bool | str, mode: str = "paper") -> bool:
    """Whether a yes/no answer is right.

    Args:
        pred: the raw ``finish[...]`` argument; None when the episode never finished.
        gold: the gold answer, a bool (or yes/no text, see :func:`as_bool_gold`).
        mode: ``"paper"``: NAT's rule, ``pred.lower()`` must be exactly ``yes`` or ``no``, so
            ``Yes.`` and ``yes, because ...`` are wrong. ``"robust"``: the first word after leading
            whitespace and punctuation decides (``yes``/``true`` or ``no``/``false``, any case).

    Raises:
        ConfigError: (a ValueError) for an unknown mode.
    """
    if mode not in SCORING_MODES:
        raise ConfigError(f"yes/no scoring mode must be one of {SCORING_MODES}, got {mode!r}")
    gold_bool = as_bool_gold(gold)
    if pred is None:
        return False
    if mode == "paper":
        lowered = pred.lower()
        if lowered == "yes":
            return gold_bool is True
        if lowered == "no":
            return gold_bool is False
        return False  # NAT compares the raw string with the bool, which is never equal
    match = _LEADING_YES_NO_RE.match(pred)
    return match is not None and _BOOL_WORDS[match.group(1).lower()] == gold_bool


# ---------------------------------------------------------------------------------------------
# NAT-k classes (HotpotQA training prompts by F1)
# ---------------------------------------------------------------------------------------------

# Classes of each scheme, worst first. Ids are plain strings; the prompt module maps them to the
# markers ("[Mostly Correct]" ...).
NAT_CLASS_SCHEMES: dict[str, tuple[str, ...]] = {
    "binary": ("incorrect", "correct"),
    "three-class": ("incorrect", "partially_correct", "correct"),
    "four-class": ("totally_incorrect", "mostly_incorrect", "mostly_correct", "correct"),
}


def nat_class(f1: float, scheme: str) -> str:
    """The NAT-k class of a trajectory with answer F1 ``f1`` (NAT's ``zero-shot-target-aware-*``).

    - ``four-class``: f1 == 0 → ``totally_incorrect``; 0 < f1 < 0.4 → ``mostly_incorrect``;
      0.4 <= f1 < 1 → ``mostly_correct``; f1 == 1 → ``correct``.
    - ``three-class``: f1 == 0 → ``incorrect``; 0 < f1 < 1 → ``partially_correct``; f1 == 1 → ``correct``.
    - ``binary``: f1 == 1 → ``correct``, else ``incorrect``. NAT's own binary template goes by the
      trajectory's ``reward`` (exact match for HotpotQA), which differs from F1 == 1 only when the
      same tokens come in another order; use the reward directly when that matters.

    Args:
        f1: the answer's token F1, in [0, 1].
        scheme: a key of :data:`NAT_CLASS_SCHEMES`.

    Raises:
        ConfigError: for an unknown scheme.
        ValueError: when ``f1`` is NaN or outside [0, 1].
    """
    if scheme not in NAT_CLASS_SCHEMES:
        raise ConfigError(f"NAT class scheme must be one of {sorted(NAT_CLASS_SCHEMES)}, got {scheme!r}")
    if not 0.0 <= f1 <= 1.0:  # also rejects NaN
        raise ValueError(f"f1 must be in [0, 1], got {f1!r}")
    classes = NAT_CLASS_SCHEMES[scheme]
    if f1 == 1.0:
        return classes[-1]
    if scheme == "binary" or f1 == 0.0:
        return classes[0]
    if scheme == "three-class":
        return classes[1]
    return classes[1] if f1 < 0.4 else classes[2]


# ---------------------------------------------------------------------------------------------
# One entry point per family
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Score:
    """The verdicts on one answer.

    Attributes:
        correct_paper: correct by the NAT repository's exact rule (HotpotQA: exact match).
        correct_robust: correct by the lenient rule (HotpotQA: exact match as well, which is already
            normalised).
        em: HotpotQA exact match; None for the other families.
        f1: HotpotQA token F1 in [0, 1]; None for the other families.
    """

    correct_paper: bool
    correct_robust: bool
    em: bool | None = None
    f1: float | None = None


def gold_text(gold: str | bool) -> str:
    """A gold answer as text, as trajectory rows store it (a yes/no bool as ``yes``/``no``)."""
    return ("yes" if gold else "no") if isinstance(gold, bool) else str(gold)


def score_answer(family: str, pred: str | None, gold: str | bool) -> Score:
    """Score one final answer.

    Args:
        family: ``"math"``, ``"hotpotqa"`` or ``"strategyqa"``.
        pred: the raw ``finish[...]`` argument; None when the episode never finished, which scores as
            wrong (HotpotQA: EM False, F1 0.0).
        gold: math: the raw gold string (``"#### 18"`` or ``"18"``; paper mode compares with the number
            NAT extracts from it); hotpotqa: the answer string; strategyqa: a bool (or yes/no text).

    Raises:
        ConfigError: for an unknown family.
    """
    if family not in FAMILIES:
        raise ConfigError(f"task family must be one of {FAMILIES}, got {family!r}")
    if family == "math":
        gold_text = gold if isinstance(gold, str) else str(gold)
        return Score(
            correct_paper=math_correct(pred, gold_text, "paper"),
            correct_robust=math_correct(pred, gold_text, "robust"),
        )
    if family == "hotpotqa":
        if pred is None:
            return Score(correct_paper=False, correct_robust=False, em=False, f1=0.0)
        em = exact_match(pred, str(gold))
        return Score(correct_paper=em, correct_robust=em, em=em, f1=f1(pred, str(gold)))
    return Score(
        correct_paper=yes_no_correct(pred, gold, "paper"),
        correct_robust=yes_no_correct(pred, gold, "robust"),
    )
