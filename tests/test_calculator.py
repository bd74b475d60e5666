"""Tests for nat_ray.tools.calculator: hand-worked values, hostile input, and property checks."""

from __future__ import annotations

import time
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nat_ray.tools import calculator
from nat_ray.tools.calculator import (
    FUNCTIONS,
    MAX_DEPTH,
    MAX_EXPONENT,
    MAX_INPUT_CHARS,
    MAX_RESULT_DIGITS,
    calculate,
)

# A hostile input must be refused well inside this many seconds, far below the evaluation deadline.
QUICK_S = 0.5


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("2 * 1", "2"),
        ("1/3 * 2", "2/3"),
        ("6 * 2/3", "4"),
        ("1,000 + 2", "1002"),
        ("$5 + 3", "8"),
        ("20% of 50", "10"),
        ("5^2", "25"),
        ("2**10", "1024"),
        ("7 % 3", "1"),
        ("0.1+0.2", "0.3"),
        ("10/4", "2.5"),
        ("sqrt(16)", "4"),
        ("sqrt(2)", "1.414213562"),
        ("-2^2", "-4"),
        ("(3+4)*5 =", "35"),
        ("round(2.567, 2)", "2.57"),
        ("max(3, 9, 4)", "9"),
        ("12 \N{MULTIPLICATION SIGN} 3 \N{DIVISION SIGN} 4", "9"),
    ],
)
def test_brief_examples(expression: str, expected: str) -> None:
    assert calculate(expression) == expected


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        # Numbers: separators, currency, leading dot, scientific notation, leading zeros.
        ("1,234,567.5", "1234567.5"),
        ("-$5", "-5"),
        ("$1,299.99 * 3", "3899.97"),
        (".5 + 1", "1.5"),
        ("1e3", "1000"),
        ("1E-2", "0.01"),
        ("007", "7"),
        ("3.0", "3"),
        # Precedence and associativity.
        ("2 + 3 * 4", "14"),
        ("2^3^2", "512"),
        ("2^-1", "0.5"),
        ("-3^2 + 10", "1"),
        ("(-2)^2", "4"),
        ("10 - 2 - 3", "5"),
        ("100 / 10 / 5", "2"),
        ("--5", "5"),
        ("\N{MINUS SIGN}5 + 2", "-3"),
        # Percent and modulo.
        ("20%", "0.2"),
        ("100 - 20% of 100", "80"),
        ("20% - 5", "-4.8"),
        ("10^2%", "1"),
        ("50% * 4", "2"),
        ("7.5 % 2", "1.5"),
        ("-7 % 3", "2"),
        ("(1 + 2) % 2", "1"),
        # Functions.
        ("abs(-3.5)", "3.5"),
        ("round(2.5)", "3"),
        ("round(-2.5)", "-3"),
        ("round(1234, -2)", "1200"),
        ("round(1/3, 5)", "0.33333"),
        ("round(sqrt(2), 3)", "1.414"),
        ("floor(-2.5)", "-3"),
        ("ceil(2.1)", "3"),
        ("ceil(-0.5)", "0"),
        ("min(3,100)", "3"),
        ("max(1, sqrt(2), 1.4)", "1.414213562"),
        ("log(8, 2)", "3"),
        ("log(100, 10)", "2"),
        ("log(1)", "0"),
        ("log(10)", "2.302585093"),
        ("exp(0)", "1"),
        ("exp(1)", "2.718281828"),
        ("exp(log(5))", "5"),
        ("SQRT(9)", "3"),
        ("4^0.5", "2"),
        ("8^(2/3)", "4"),
        ("2^0.5", "1.414213562"),
        ("sqrt(2.25)", "1.5"),
        ("sqrt(2) - sqrt(2)", "0"),
        # Formatting.
        ("1000 * 1000", "1000000"),
        ("-10/4", "-2.5"),
        ("1/1024", "0.0009765625"),
        ("1e-5", "0.00001"),
        ("-1/3", "-1/3"),
        ("22/7", "22/7"),
        ("1/7 * 7", "1"),
        ("sqrt(2) * 10^6", "1414213.562"),
        ("10^30 * sqrt(2)", "1.414213562e+30"),
        ("sqrt(2) / 10^30", "1.414213562e-30"),
        ("0^0", "1"),
        # Cleaning.
        ("  `2+3`  ", "5"),
        ('"2+3"', "5"),
        ("```12*2``` = ", "24"),
        ("'7'", "7"),
    ],
)
def test_values(expression: str, expected: str) -> None:
    assert calculate(expression) == expected


def test_large_integer_is_plain_digits() -> None:
    result = calculate("2^1000")
    assert result == str(2**1000)


def test_result_just_under_digit_limit_is_printed_in_full() -> None:
    # 10^9999 has exactly MAX_RESULT_DIGITS digits; its text is longer than str(int)'s default limit.
    result = calculate("*".join(["10^909"] * 11))
    assert result == "1" + "0" * 9999
    assert len(result) == MAX_RESULT_DIGITS


@pytest.mark.parametrize(
    "expression",
    [
        "__import__('os').system('echo hi')",
        "exec('1')",
        "eval('1+1')",
        "lambda: 1",
        "().__class__",
        "(1).__class__",
        "open('/etc/passwd').read()",
        "9**9**9**9",
        "9^9^9",
        "2^100000",
        "*".join(["10**1000"] * 12),
        "(10^1000)^10",
        "(" * 1000 + "1" + ")" * 1000,
        "(" * (MAX_DEPTH + 1) + "1" + ")" * (MAX_DEPTH + 1),
        "2" + "^2" * (MAX_DEPTH + 1),
        "1" * 100_000,
        "1/0",
        "1/(3-3)",
        "0^-1",
        "5 % 0",
        "sqrt(-1)",
        "(-8)^(1/3)",
        "log(0)",
        "log(-2)",
        "log(8, 1)",
        "exp(30000)",
        "factorial(10000)",
        "x + 1",
        "",
        "   ",
        "=",
        "1e999999",
        "1; 2",
        "1\n+ 2",
        "[1 + 2]",
        "{1}",
        "'a' * 3",
        "2 3",
        "2(3)",
        "(2",
        "2)",
        "2 +",
        "sqrt 4",
        "sqrt(4, 5)",
        "max()",
        "round(2.5, 1.5)",
        "1,0000",
        "(2) of 3",
        "$",
        "1.2.3",
        "pi",
        "1 if 1 else 2",
        "2 == 2",
        "1_000",
        "0x10",
        "٣ + 1",
    ],
)
def test_refused_quickly(expression: str) -> None:
    start = time.perf_counter()
    result = calculate(expression)
    elapsed = time.perf_counter() - start
    assert result.startswith("Error:"), result
    assert elapsed < QUICK_S


@pytest.mark.parametrize("value", [None, 42, 1.5, b"1+1", ["1"], object()])
def test_non_text_is_refused(value: object) -> None:
    assert calculate(value).startswith("Error: expected the expression as text")


def test_error_names_the_unknown_name_and_what_is_allowed() -> None:
    assert calculate("os") == (
        "Error: unknown name 'os' at position 0; only numbers, + - * / ^ % ( ) and "
        "sqrt, abs, round, floor, ceil, min, max, log, exp are allowed"
    )
    assert set(FUNCTIONS) == {"sqrt", "abs", "round", "floor", "ceil", "min", "max", "log", "exp"}


@pytest.mark.parametrize(
    ("expression", "fragment"),
    [
        ("1" * (MAX_INPUT_CHARS + 1), f"the limit is {MAX_INPUT_CHARS}"),
        ("(" * (MAX_DEPTH + 1) + "1" + ")" * (MAX_DEPTH + 1), f"limit of {MAX_DEPTH} levels"),
        ("2^100000", f"limit of ±{MAX_EXPONENT}"),
        ("1e999999", f"limit of ±{MAX_EXPONENT}"),
        ("*".join(["10**1000"] * 12), f"the limit is {MAX_RESULT_DIGITS}"),
        ("(10^1000)^10", f"the limit is {MAX_RESULT_DIGITS}"),
        ("1/0", "division by zero"),
        ("5 % 0", "modulo by zero"),
        ("sqrt(-1)", "not a real number"),
        ("[1]", "square brackets"),
        ("1\n2", "line breaks"),
        ("sqrt(4, 5)", "sqrt() takes 1 argument, got 2"),
        ("2 3", "missing operator before '3' at position 2"),
    ],
)
def test_error_says_what_is_wrong(expression: str, fragment: str) -> None:
    result = calculate(expression)
    assert result.startswith("Error:")
    assert fragment in result


def test_deadline_stops_evaluation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(calculator, "TIME_LIMIT_S", -1.0)
    assert calculate("1 + 1").startswith("Error: evaluation took longer than the limit")


def test_nesting_at_the_limit_is_allowed() -> None:
    assert calculate("(" * MAX_DEPTH + "1" + ")" * MAX_DEPTH) == "1"


def test_input_at_the_length_limit_is_allowed() -> None:
    expression = "+".join(["1"] * 250).ljust(MAX_INPUT_CHARS)
    assert len(expression) == MAX_INPUT_CHARS
    assert calculate(expression) == "250"


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_any_text_gives_a_string(text: str) -> None:
    result = calculate(text)
    assert isinstance(result, str)
    assert result


@settings(max_examples=200, deadline=None)
@given(
    st.text(
        alphabet="0123456789.,$%+-*/^()e =\N{MULTIPLICATION SIGN}\N{DIVISION SIGN}\N{MINUS SIGN}", max_size=60
    )
)
def test_grammar_characters_give_a_value_or_an_error(text: str) -> None:
    # Text made of the grammar's own characters reaches the parser and evaluator, not just the tokenizer.
    result = calculate(text)
    assert result.startswith("Error:") or isinstance(Fraction(result), Fraction)


_Case = tuple[str, Fraction | None]


def _arithmetic(max_leaves: int = 12) -> st.SearchStrategy[_Case]:
    """Expression text and its exact value (None after a division by zero), from small integers."""
    leaves = st.integers(min_value=-20, max_value=20).map(lambda n: (str(n), Fraction(n)))

    def extend(children: st.SearchStrategy[_Case]) -> st.SearchStrategy[_Case]:
        def combine(left: _Case, op: str, right: _Case) -> _Case:
            left_text, left_value = left
            right_text, right_value = right
            text = f"({left_text}) {op} ({right_text})"
            if left_value is None or right_value is None:
                return text, None
            if op == "+":
                return text, left_value + right_value
            if op == "-":
                return text, left_value - right_value
            if op == "*":
                return text, left_value * right_value
            return text, None if right_value == 0 else left_value / right_value

        return st.builds(combine, children, st.sampled_from("+-*/"), children)

    return st.recursive(leaves, extend, max_leaves=max_leaves)


@settings(max_examples=200, deadline=None)
@given(_arithmetic())
def test_arithmetic_matches_fractions(case: tuple[str, Fraction | None]) -> None:
    text, expected = case
    result = calculate(text)
    if expected is None:
        assert result == "Error: division by zero"
        return
    assert Fraction(result) == expected
    terminates = all(p in (2, 5) for p in _prime_factors(expected.denominator))
    assert ("/" in result) == (not terminates)
    if expected.denominator == 1:
        assert result == str(expected.numerator)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("+-*"), st.integers(-(10**6), 10**6)), max_size=15))
def test_flat_integer_arithmetic_matches_python(terms: list[tuple[str, int]]) -> None:
    # Without parentheses: checks that * binds tighter than + and -, and that signs are handled.
    text = "7" + "".join(f" {op} {number}" for op, number in terms)
    # Expected value with the usual precedence, as a sum of signed products.
    expected = 0
    sign, product = 1, 7
    for op, number in terms:
        if op == "*":
            product *= number
        else:
            expected += sign * product
            sign, product = (1 if op == "+" else -1), number
    expected += sign * product
    assert calculate(text) == str(expected)


def _prime_factors(n: int) -> set[int]:
    factors = set()
    divisor = 2
    while divisor * divisor <= n:
        while n % divisor == 0:
            factors.add(divisor)
            n //= divisor
        divisor += 1
    if n > 1:
        factors.add(n)
    return factors
