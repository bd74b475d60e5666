"""Safe arithmetic for the agent's ``calculate[...]`` action: ``calculate("6 * 2/3") -> "4"``.

The argument is text a model wrote, so it is untrusted. The research code handed it to
``sympy.sympify``, which runs ``eval``; here a small tokenizer and recursive-descent parser accept
only a whitelisted arithmetic grammar and build a tree, and the tree is evaluated with SymPy numbers.
Nothing in the input is ever executed. Every problem (bad syntax, an unknown name, a result too large,
a slow evaluation) comes back as an ``Error: ...`` observation that the model can read and act on.

Grammar, lowest precedence first::

    expr     := term (("+" | "-") term)*
    term     := unary (("*" | "/" | "%" | "of") unary)*      # "%" here is modulo: 7 % 3 = 1
    unary    := ("+" | "-")* percent                         # -2^2 = -4
    percent  := power "%"*                                   # postfix percent: 20% = 1/5
    power    := primary ("^" exponent)?                      # right-associative: 2^3^2 = 2^9
    exponent := ("+" | "-")* power
    primary  := NUMBER | FUNCTION "(" expr ("," expr)* ")" | "(" expr ")"

A ``%`` is modulo when a number, ``(`` or a function name follows it, and a postfix percent
otherwise (``20% - 5`` is ``0.2 - 5``). ``of`` multiplies and may only follow a number or a percent
(``20% of 50`` = 10). ``**`` is a synonym of ``^``, and the multiplication, division and minus signs
(U+00D7, U+00F7, U+2212) of ``*``, ``/`` and ``-``.
Function names and ``of`` are matched case-insensitively.

Numbers: ``12``, ``3.25``, ``.5``, ``1e3``, thousands separators ``1,234,567.5`` (a comma followed by
exactly three digits, after a first group of one to three digits) and a leading ``$``. Inside a
function's own parentheses a comma always separates arguments, so ``max(3,100)`` is 100, not 3100.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from decimal import Decimal

import sympy
from mpmath import libmp

logger = logging.getLogger(__name__)

MAX_INPUT_CHARS = 500
"""Longest expression accepted, counted before surrounding whitespace and quotes are stripped."""

MAX_DEPTH = 30
"""Deepest nesting of parentheses, function calls and chained powers (``2^2^2`` nests twice)."""

MAX_EXPONENT = 1000
"""Largest ``|exponent|`` in a power, and in scientific notation such as ``1e3``."""

MAX_RESULT_DIGITS = 10_000
"""Most decimal digits an exact integer, numerator or denominator may have; floats must stay
within ``10**±MAX_RESULT_DIGITS``."""

TIME_LIMIT_S = 1.0
"""Wall-clock budget for evaluating one expression, checked before each node of the tree."""

SIGNIFICANT_DIGITS = 10
"""Significant digits shown for inexact (irrational) results: ``sqrt(2)`` -> ``1.414213562``."""

FUNCTIONS: dict[str, tuple[int, int | None]] = {
    "sqrt": (1, 1),
    "abs": (1, 1),
    "round": (1, 2),
    "floor": (1, 1),
    "ceil": (1, 1),
    "min": (1, None),
    "max": (1, None),
    "log": (1, 2),
    "exp": (1, 1),
}
"""Whitelisted functions and their (fewest, most) arguments; ``None`` means any number."""

# Irrational results are carried with this many digits so that the 10 shown are right.
_WORKING_DIGITS = 30
# Inexact results with a decimal exponent outside this range are shown as 1.5e+25, like JavaScript.
_POSITIONAL_EXPONENTS = range(-20, 21)
_LOG10_2 = math.log10(2)
_MAX_FLOAT_BITS = int(MAX_RESULT_DIGITS / _LOG10_2)
# exp(x) above this would exceed 10**MAX_RESULT_DIGITS; refusing early avoids a costly evaluation.
_MAX_EXP_ARGUMENT = MAX_RESULT_DIGITS * math.log(10)
# str(int) refuses more than sys.get_int_max_str_digits() digits (at least 640), so convert in chunks.
_STR_CHUNK_BITS = 2000

_DIGITS = "0123456789"
_OPERATOR_ALIASES = {"\N{MULTIPLICATION SIGN}": "*", "\N{DIVISION SIGN}": "/", "\N{MINUS SIGN}": "-"}
_OPERATORS = "+-*/^%(),"
_QUOTES = "`'\""
_LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
_OF = "of"
_ALLOWED = f"only numbers, + - * / ^ % ( ) and {', '.join(FUNCTIONS)} are allowed"

_Value = sympy.Rational | sympy.Float


class _CalculatorError(Exception):
    """Input the calculator refuses; the message becomes the ``Error:`` observation."""


def calculate(expression: object) -> str:
    """Evaluates one arithmetic expression written by the model, without executing it.

    Args:
        expression: The text inside ``calculate[...]``. Anything that is not a ``str`` is refused.

    Returns:
        The value as text: an integer as plain digits (``1000000``), a fraction whose decimal
        expansion ends as a decimal (``2.5``), any other fraction as ``p/q`` (``2/3``), and an
        irrational value with 10 significant digits and no trailing zeros (``1.414213562``),
        written with an exponent (``1.414213562e+30``) only below 1e-20 or from 1e21 up. Refused or
        failed input gives ``Error: <what is wrong>``, where positions count characters from 0 in
        the expression after stripping; this function never raises.
    """
    if not isinstance(expression, str):
        return f"Error: expected the expression as text, got {type(expression).__name__}"
    if len(expression) > MAX_INPUT_CHARS:
        return f"Error: expression is {len(expression)} characters long; the limit is {MAX_INPUT_CHARS}"
    try:
        tokens = _tokenize(_clean(expression))
        tree = _Parser(tokens).parse()
        return _format(_evaluate(tree, time.monotonic() + TIME_LIMIT_S))
    except _CalculatorError as error:
        return f"Error: {error}"
    except (ArithmeticError, ValueError, TypeError, RecursionError) as error:
        # The grammar and limits should stop everything before SymPy fails; reaching this is a gap
        # worth hearing about, but the model still gets an observation rather than a crashed episode.
        logger.warning("calculate(%r) failed during evaluation: %r", expression, error)
        return f"Error: could not evaluate the expression ({type(error).__name__})"


def _clean(text: str) -> str:
    """Strips whitespace, trailing ``=`` and matching outer quotes or backticks, repeatedly."""
    previous = None
    while text != previous:
        previous = text
        text = text.strip()
        if text.endswith("="):
            text = text[:-1]
        if len(text) >= 2 and text[0] == text[-1] and text[0] in _QUOTES:
            text = text[1:-1]
    if not text:
        raise _CalculatorError("empty expression; write arithmetic such as 2 * (3 + 4)")
    return text


# ---------------------------------------------------------------------------------------------
# Tokens


@dataclass(frozen=True)
class _Token:
    """One lexical unit; ``kind`` is "number", "name", "op" or "end"."""

    kind: str
    text: str
    pos: int
    value: sympy.Rational | None = None

    def is_op(self, *ops: str) -> bool:
        return self.kind == "op" and self.text in ops

    def describe(self) -> str:
        return "the end of the expression" if self.kind == "end" else f"{self.text!r} at position {self.pos}"


def _is_digit(text: str, i: int) -> bool:
    return i < len(text) and text[i] in _DIGITS


def _tokenize(text: str) -> list[_Token]:
    """Splits ``text`` into tokens, refusing any character or name outside the grammar.

    Raises:
        _CalculatorError: On the first character or name that is not allowed; positions count
            from 0 in the cleaned expression.
    """
    tokens: list[_Token] = []
    # One entry per open "(": True when it opened a function call, whose commas separate arguments.
    open_parens: list[bool] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch in _LINE_BREAKS:
            raise _CalculatorError("line breaks are not allowed inside the expression")
        if ch.isspace():
            i += 1
            continue
        if ch in _DIGITS or ch == "$" or (ch == "." and _is_digit(text, i + 1)):
            commas_are_separators = not open_parens or not open_parens[-1]
            value, end = _read_number(text, i, commas_are_separators)
            tokens.append(_Token("number", text[i:end], i, value))
            i = end
            continue
        if ch.isascii() and (ch.isalpha() or ch == "_"):
            end = i + 1
            while end < len(text) and text[end].isascii() and (text[end].isalnum() or text[end] == "_"):
                end += 1
            name = text[i:end].lower()
            if name not in FUNCTIONS and name != _OF:
                raise _CalculatorError(f"unknown name {text[i:end]!r} at position {i}; {_ALLOWED}")
            tokens.append(_Token("name", name, i))
            i = end
            continue
        op = _OPERATOR_ALIASES.get(ch, ch)
        if op == "*" and text.startswith("**", i):
            tokens.append(_Token("op", "^", i))
            i += 2
            continue
        if op in _OPERATORS:
            if op == "(":
                open_parens.append(bool(tokens) and tokens[-1].kind == "name" and tokens[-1].text != _OF)
            elif op == ")" and open_parens:
                open_parens.pop()
            elif op == "," and (not open_parens or not open_parens[-1]):
                raise _CalculatorError(
                    f"unexpected ',' at position {i}; a comma either separates a function's arguments "
                    "or groups thousands as in 1,000"
                )
            tokens.append(_Token("op", op, i))
            i += 1
            continue
        raise _CalculatorError(_describe_bad_character(ch, i))
    tokens.append(_Token("end", "", len(text)))
    return tokens


def _describe_bad_character(ch: str, i: int) -> str:
    """Says why ``ch`` is refused, with a hint for the mistakes models tend to make."""
    if ch in "[]":
        return f"square brackets are not allowed (position {i}); use parentheses ( )"
    if ch in _QUOTES:
        return f"quotes are not allowed (position {i}); write only the arithmetic, such as 2 * (3 + 4)"
    if ch == ".":
        return f"'.' at position {i} is not part of a number; {_ALLOWED}"
    return f"unexpected character {ch!r} at position {i}; {_ALLOWED}"


def _read_number(text: str, start: int, commas_are_separators: bool) -> tuple[sympy.Rational, int]:
    """Reads the number at ``text[start]`` as an exact Rational.

    Args:
        text: The cleaned expression.
        start: Index of the number's first character (a digit, ``.`` or ``$``).
        commas_are_separators: Whether ``,ddd`` continues the number (False inside a call's arguments).

    Returns:
        The value and the index just past the number.

    Raises:
        _CalculatorError: On a bare ``$`` or a scientific exponent beyond ``MAX_EXPONENT``.
    """
    i = start
    if text[i] == "$":
        i += 1
        if not (_is_digit(text, i) or (i < len(text) and text[i] == "." and _is_digit(text, i + 1))):
            raise _CalculatorError(f"'$' at position {start} must be followed by a number, as in $5")
    end = i
    while _is_digit(text, end):
        end += 1
    whole = text[i:end]
    if commas_are_separators and 1 <= len(whole) <= 3:
        while (
            text.startswith(",", end)
            and all(_is_digit(text, end + k) for k in (1, 2, 3))
            and not _is_digit(text, end + 4)
        ):
            whole += text[end + 1 : end + 4]
            end += 4
    fraction = ""
    if text.startswith(".", end) and _is_digit(text, end + 1):
        fraction_start = end + 1
        end = fraction_start
        while _is_digit(text, end):
            end += 1
        fraction = text[fraction_start:end]
    exponent = 0
    if end < len(text) and text[end] in "eE":
        digits_start = end + 2 if text.startswith(("+", "-"), end + 1) else end + 1
        if _is_digit(text, digits_start):
            digits_end = digits_start
            while _is_digit(text, digits_end):
                digits_end += 1
            exponent = int(text[end + 1 : digits_end])
            if abs(exponent) > MAX_EXPONENT:
                number = text[start:digits_end]
                raise _CalculatorError(
                    f"exponent {exponent} in {number!r} is beyond the limit of ±{MAX_EXPONENT}"
                )
            end = digits_end
    numerator = int(whole + fraction) * 10 ** max(exponent, 0)
    denominator = 10 ** (len(fraction) + max(-exponent, 0))
    return sympy.Rational(numerator, denominator), end


# ---------------------------------------------------------------------------------------------
# Tree


@dataclass(frozen=True)
class _Number:
    value: sympy.Rational


@dataclass(frozen=True)
class _Negate:
    operand: _Node


@dataclass(frozen=True)
class _Percent:
    operand: _Node


@dataclass(frozen=True)
class _Binary:
    op: str  # one of + - * / % ^ ("of" is stored as "*")
    left: _Node
    right: _Node


@dataclass(frozen=True)
class _Call:
    name: str
    args: tuple[_Node, ...]


_Node = _Number | _Negate | _Percent | _Binary | _Call


class _Parser:
    """Recursive-descent parser for the grammar in the module docstring; one method per rule."""

    def __init__(self, tokens: list[_Token]) -> None:
        self.tokens = tokens
        self.index = 0
        self.depth = 0

    def parse(self) -> _Node:
        node = self._expr()
        if self._peek().kind != "end":
            raise self._after_operand_error(self._peek())
        return node

    def _peek(self) -> _Token:
        return self.tokens[self.index]

    def _advance(self) -> _Token:
        token = self.tokens[self.index]
        self.index += 1
        return token

    def _enter(self, token: _Token) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise _CalculatorError(
                f"nesting is deeper than the limit of {MAX_DEPTH} levels (at position {token.pos})"
            )

    def _expr(self) -> _Node:
        node = self._term()
        while self._peek().is_op("+", "-"):
            node = _Binary(self._advance().text, node, self._term())
        return node

    def _term(self) -> _Node:
        node = self._unary()
        while True:
            token = self._peek()
            if token.is_op("*", "/", "%"):
                node = _Binary(self._advance().text, node, self._unary())
            elif token.kind == "name" and token.text == _OF:
                before = self.tokens[self.index - 1]
                if not (before.kind == "number" or before.is_op("%")):
                    raise _CalculatorError(
                        f"'of' at position {token.pos} must follow a number or a percentage, as in 20% of 50"
                    )
                self._advance()
                node = _Binary("*", node, self._unary())
            else:
                return node

    def _signs(self) -> bool:
        """Consumes a run of unary + and -; returns True when they negate."""
        negative = False
        while self._peek().is_op("+", "-"):
            negative ^= self._advance().text == "-"
        return negative

    def _unary(self) -> _Node:
        negative = self._signs()
        node = self._percent()
        return _Negate(node) if negative else node

    def _percent(self) -> _Node:
        node = self._power()
        while self._peek().is_op("%") and not self._starts_operand(self.tokens[self.index + 1]):
            self._advance()
            node = _Percent(node)
        return node

    def _power(self) -> _Node:
        base = self._primary()
        if not self._peek().is_op("^"):
            return base
        self._enter(self._advance())
        negative = self._signs()
        exponent = self._power()
        self.depth -= 1
        return _Binary("^", base, _Negate(exponent) if negative else exponent)

    def _primary(self) -> _Node:
        token = self._peek()
        if token.kind == "number":
            self._advance()
            return _Number(token.value)
        if token.is_op("("):
            self._enter(self._advance())
            node = self._expr()
            self._close(token)
            return node
        if token.kind == "name" and token.text != _OF:
            return self._call()
        if token.kind == "end":
            previous = f" after {self.tokens[self.index - 1].text!r}" if self.index else ""
            raise _CalculatorError(f"the expression ends{previous} where a number was expected")
        if token.is_op(")"):
            raise _CalculatorError(f"expected a number before ')' at position {token.pos}")
        raise _CalculatorError(f"expected a number, '(' or a function, found {token.describe()}")

    def _call(self) -> _Node:
        name = self._advance()
        if not self._peek().is_op("("):
            raise _CalculatorError(
                f"function {name.text!r} at position {name.pos} must be followed by '(', "
                f"as in {name.text}(2), found {self._peek().describe()}"
            )
        opening = self._advance()
        self._enter(opening)
        if self._peek().is_op(")"):
            raise _CalculatorError(f"{name.text}() at position {name.pos} needs {_arity(name.text)}")
        args = [self._expr()]
        while self._peek().is_op(","):
            self._advance()
            args.append(self._expr())
        self._close(opening)
        fewest, most = FUNCTIONS[name.text]
        if len(args) < fewest or (most is not None and len(args) > most):
            raise _CalculatorError(f"{name.text}() takes {_arity(name.text)}, got {len(args)}")
        return _Call(name.text, tuple(args))

    def _close(self, opening: _Token) -> None:
        token = self._peek()
        if token.is_op(")"):
            self._advance()
            self.depth -= 1
            return
        if token.kind == "end":
            raise _CalculatorError(f"missing ')' to close the '(' at position {opening.pos}")
        raise self._after_operand_error(token)

    @staticmethod
    def _starts_operand(token: _Token) -> bool:
        return token.kind == "number" or token.is_op("(") or (token.kind == "name" and token.text != _OF)

    @staticmethod
    def _after_operand_error(token: _Token) -> _CalculatorError:
        if token.is_op(")"):
            return _CalculatorError(f"unmatched ')' at position {token.pos}")
        if token.is_op(","):
            return _CalculatorError(f"unexpected ',' at position {token.pos}")
        return _CalculatorError(f"missing operator before {token.describe()}")


def _arity(name: str) -> str:
    fewest, most = FUNCTIONS[name]
    if most is None:
        return f"at least {fewest} argument" + ("s" if fewest > 1 else "")
    if fewest == most:
        return f"{fewest} argument" + ("s" if fewest > 1 else "")
    return f"{fewest} or {most} arguments"


# ---------------------------------------------------------------------------------------------
# Evaluation


def _evaluate(node: _Node, deadline: float) -> _Value:
    """Evaluates the tree bottom-up with exact Rationals, switching to Floats only for irrationals.

    Args:
        node: Root of the tree from :class:`_Parser`.
        deadline: ``time.monotonic()`` value after which evaluation is abandoned.

    Raises:
        _CalculatorError: On a domain error, a limit, or the deadline.
    """
    if time.monotonic() > deadline:
        raise _CalculatorError(f"evaluation took longer than the limit of {TIME_LIMIT_S:g} second(s)")
    if isinstance(node, _Number):
        return _checked(node.value)
    if isinstance(node, _Negate):
        return -_evaluate(node.operand, deadline)
    if isinstance(node, _Percent):
        return _checked(_evaluate(node.operand, deadline) / 100)
    if isinstance(node, _Binary):
        left = _evaluate(node.left, deadline)
        right = _evaluate(node.right, deadline)
        return _checked(_apply(node.op, left, right))
    if isinstance(node, _Call):
        args = [_evaluate(arg, deadline) for arg in node.args]
        return _checked(_call(node.name, args))
    raise TypeError(f"unknown node type {type(node).__name__}")


def _apply(op: str, left: _Value, right: _Value) -> _Value:
    if op == "+":
        return left + right
    if op == "-":
        return left - right
    if op == "*":
        return left * right
    if op == "/":
        if right == 0:
            raise _CalculatorError("division by zero")
        return left / right
    if op == "%":
        if right == 0:
            raise _CalculatorError("modulo by zero")
        return left % right
    if op == "^":
        return _power(left, right)
    raise ValueError(f"unknown operator {op!r}")


def _power(base: _Value, exponent: _Value) -> _Value:
    """Raises ``base`` to ``exponent``, exactly when both are rational and the result is rational."""
    if abs(exponent) > MAX_EXPONENT:
        raise _CalculatorError(f"exponent {_short(exponent)} is beyond the limit of ±{MAX_EXPONENT}")
    if base == 0:
        if exponent < 0:
            raise _CalculatorError("division by zero (0 raised to a negative power)")
        return sympy.Integer(1) if exponent == 0 else sympy.Integer(0)
    if isinstance(exponent, sympy.Rational) and exponent.q == 1:
        if isinstance(base, sympy.Rational):
            return _integer_power(base, int(exponent))
        return base**exponent
    if base < 0:
        raise _CalculatorError(
            f"a negative number to the fractional power {_short(exponent)} is not a real number"
        )
    if isinstance(base, sympy.Rational) and isinstance(exponent, sympy.Rational):
        # Try an exact root first so that 4^0.5 is 2 and 8^(2/3) is 4, not 2.000000000.
        numerator, numerator_exact = sympy.integer_nthroot(base.p, exponent.q)
        denominator, denominator_exact = sympy.integer_nthroot(base.q, exponent.q)
        if numerator_exact and denominator_exact:
            return _integer_power(sympy.Rational(numerator, denominator), exponent.p)
    return _to_float(base) ** _to_float(exponent)


def _integer_power(base: sympy.Rational, exponent: int) -> sympy.Rational:
    """Exact ``base ** exponent``, refused before computing when the result would be too large."""
    if base == 0 and exponent < 0:
        raise _CalculatorError("division by zero (0 raised to a negative power)")
    largest_bits = max(abs(base.p).bit_length(), base.q.bit_length())
    # A lower bound on the digits of the result's numerator or denominator.
    digits = abs(exponent) * (largest_bits - 1) * _LOG10_2
    if digits > MAX_RESULT_DIGITS:
        raise _CalculatorError(
            f"{_short(base)}^{exponent} would have about {int(digits)} digits; "
            f"the limit is {MAX_RESULT_DIGITS}"
        )
    return base**exponent


def _call(name: str, args: list[_Value]) -> _Value:
    """Applies a whitelisted function; the parser has already checked the argument count."""
    x = args[0]
    if name == "sqrt":
        if x < 0:
            raise _CalculatorError("sqrt of a negative number is not a real number")
        return _power(x, sympy.Rational(1, 2))
    if name == "abs":
        return abs(x)
    if name == "round":
        return _round(x, args[1] if len(args) == 2 else sympy.Integer(0))
    if name == "floor":
        exact = _exact(x)
        return sympy.Integer(exact.p // exact.q)
    if name == "ceil":
        exact = _exact(x)
        return sympy.Integer(-(-exact.p // exact.q))
    if name == "min":
        return min(args)
    if name == "max":
        return max(args)
    if name == "log":
        return _log(x, args[1] if len(args) == 2 else None)
    if name == "exp":
        if x == 0:
            return sympy.Integer(1)
        if abs(x) > _MAX_EXP_ARGUMENT:
            raise _CalculatorError(
                f"exp({_short(x)}) is beyond the limit of 10^±{MAX_RESULT_DIGITS} "
                f"(the argument must be within ±{_MAX_EXP_ARGUMENT:.0f})"
            )
        return sympy.exp(_to_float(x))
    raise ValueError(f"unknown function {name!r}")


def _round(x: _Value, places: _Value) -> sympy.Rational:
    """Rounds half away from zero (2.5 -> 3), as people do by hand, to ``places`` decimals."""
    if not (isinstance(places, sympy.Rational) and places.q == 1):
        raise _CalculatorError(f"round()'s second argument must be a whole number, got {_short(places)}")
    if abs(places) > MAX_EXPONENT:
        raise _CalculatorError(f"round() to {_short(places)} places is beyond the limit of ±{MAX_EXPONENT}")
    scale = sympy.Rational(10) ** int(places)
    scaled = _exact(x) * scale
    # floor(|scaled| + 1/2), in integers.
    magnitude = (2 * abs(scaled.p) + scaled.q) // (2 * scaled.q)
    return sympy.Rational(magnitude if scaled >= 0 else -magnitude) / scale


def _log(x: _Value, base: _Value | None) -> _Value:
    """Natural log, or log to ``base``; exact when ``x`` is an integer power of a rational base."""
    if x <= 0:
        raise _CalculatorError("log() is only defined for positive numbers")
    if base is None:
        return sympy.Integer(0) if x == 1 else sympy.log(_to_float(x))
    if base <= 0 or base == 1:
        raise _CalculatorError("the base of log() must be positive and not 1")
    value = sympy.log(_to_float(x)) / sympy.log(_to_float(base))
    if isinstance(x, sympy.Rational) and isinstance(base, sympy.Rational) and abs(value) <= MAX_EXPONENT:
        nearest = int(value.round())
        try:
            if _integer_power(base, nearest) == x:
                return sympy.Integer(nearest)
        except _CalculatorError:
            # base^nearest is too large to equal x, which is within the limits.
            pass
    return value


def _to_float(x: _Value) -> sympy.Float:
    """``x`` as a Float of ``_WORKING_DIGITS`` digits.

    ``evalf`` rather than ``sympy.Float(x)``, which goes through ``str`` and so fails on integers
    longer than Python's 4300-digit string limit.
    """
    value = x.evalf(_WORKING_DIGITS)
    # evalf keeps an exact zero as Integer zero; no size problem there.
    return value if isinstance(value, sympy.Float) else sympy.Float(0, _WORKING_DIGITS)


def _exact(x: _Value) -> sympy.Rational:
    """The exact Rational of ``x``; a Float converts to the binary fraction it stores."""
    return x if isinstance(x, sympy.Rational) else sympy.Rational(x)


def _digit_count(n: int) -> int:
    """Number of decimal digits of ``n``, possibly one short, without building its string."""
    return int(abs(n).bit_length() * _LOG10_2) + 1


def _checked(value: sympy.Expr) -> _Value:
    """Returns ``value`` if it is a real number within the size limits.

    Raises:
        _CalculatorError: For non-real or infinite values, or values beyond ``MAX_RESULT_DIGITS``.
    """
    if isinstance(value, sympy.Rational):
        digits = max(_digit_count(value.p), _digit_count(value.q))
        if digits > MAX_RESULT_DIGITS:
            raise _CalculatorError(
                f"the result would have about {digits} digits; the limit is {MAX_RESULT_DIGITS}"
            )
        return value
    if not isinstance(value, sympy.Float):
        raise _CalculatorError("the result is not a finite real number")
    _, mantissa, exponent, bits = value._mpf_
    magnitude = exponent + bits  # |value| is about 2**magnitude
    if mantissa and abs(magnitude) > _MAX_FLOAT_BITS:
        raise _CalculatorError(
            f"the result is about 10^{int(magnitude * _LOG10_2)}, beyond the limit of 10^±{MAX_RESULT_DIGITS}"
        )
    return value


# ---------------------------------------------------------------------------------------------
# Formatting


def _format(value: _Value) -> str:
    """Writes a result the way a person would read it (see :func:`calculate` for the rules)."""
    if isinstance(value, sympy.Float):
        return _format_float(value)
    p, q = value.p, value.q
    if q == 1:
        return _int_to_str(p)
    sign = "-" if p < 0 else ""
    twos = (q & -q).bit_length() - 1
    fives = _power_of_five(q >> twos)
    if fives is None:
        return f"{sign}{_int_to_str(abs(p))}/{_int_to_str(q)}"
    # p/q == p * 2^(places - twos) * 5^(places - fives) / 10^places, and p shares no factor with 10
    # beyond what the multiplier adds, so the digits end without trailing zeros.
    places = max(twos, fives)
    digits = _int_to_str(abs(p) * 2 ** (places - twos) * 5 ** (places - fives)).rjust(places + 1, "0")
    return f"{sign}{digits[:-places]}.{digits[-places:]}"


def _power_of_five(n: int) -> int | None:
    """``k`` when ``n == 5**k``, else None; guesses ``k`` from the bit length instead of dividing."""
    if n == 1:
        return 0
    guess = round((n.bit_length() - 0.5) / math.log2(5))
    for k in (guess - 1, guess, guess + 1):
        if k > 0 and 5**k == n:
            return k
    return None


def _int_to_str(n: int) -> str:
    """``str(n)`` for any size: large ints are split so no piece meets Python's digit-count limit."""
    if n < 0:
        return "-" + _int_to_str(-n)
    if n.bit_length() <= _STR_CHUNK_BITS:
        return str(n)
    half = int(n.bit_length() * _LOG10_2) // 2
    high, low = divmod(n, 10**half)
    return _int_to_str(high) + _int_to_str(low).rjust(half, "0")


def _format_float(value: sympy.Float) -> str:
    """Rounds to ``SIGNIFICANT_DIGITS``, drops trailing zeros, and avoids exponents for usual sizes."""
    number = Decimal(libmp.to_str(value._mpf_, SIGNIFICANT_DIGITS))
    if number == 0:
        return "0"
    number = number.normalize()
    if number.adjusted() in _POSITIONAL_EXPONENTS:
        return format(number, "f")
    return format(number, "e")


def _short(value: _Value) -> str:
    """A value for an error message, cut short so a huge number cannot flood the observation."""
    text = _format(value)
    return text if len(text) <= 40 else f"{text[:20]}...({len(text)} characters)"
