"""The `calculator` tool: arithmetic on integers and decimals, by a parser of its own (no `eval`).

    calculate("4821 * 37")        # "178377"
    calculate("(1 + 2) / 8")      # "0.375"
    calculate("2 ** 0.5")         # ToolError: the exponent must be an integer
    calculate("9 ** 9 ** 9")      # ToolError: the result would have about 370 million digits

The grammar, with Python's precedence (`^` is a power too, as on calculators; `x`, `×`, `÷`
and `−` are read as `*`, `*`, `/` and `-`):

    expr  := term (("+" | "-") term)*
    term  := unary (("*" | "/" | "//" | "%") unary)*
    unary := ("+" | "-") unary | power
    power := atom (("**" | "^") unary)?        right-associative: 2**3**2 == 2**9, -2**2 == -4
    atom  := NUMBER | "(" expr ")"

Numbers are exact fractions (`Fraction`), so 0.1 + 0.2 is 0.3. Every bound is checked before the
work it bounds: the expression's length and nesting, and the size of every number (at most
MAX_DIGITS digits in its numerator and denominator; a power's size is estimated from its
operands before it is computed), so no expression takes more than milliseconds or megabytes.
A result that is not an integer is written as a decimal with up to SIGNIFICANT digits.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal, localcontext
from fractions import Fraction

from ..errors import QuillError, shown

MAX_CHARS = 2000  # characters of an expression
MAX_DEPTH = 64  # nested parentheses and signs
MAX_DIGITS = 1000  # digits of any number met on the way (numerator and denominator each)
MAX_BITS = int(MAX_DIGITS * 3.3219280948873626)  # the same bound in bits
SIGNIFICANT = 28  # significant digits of a result that is not an integer

TOKEN = re.compile(r"\s*(?:(\d+(?:\.\d*)?|\.\d+)|(\*\*|//|[-+*/%^()]))")
SYNONYMS = str.maketrans({"×": "*", "x": "*", "X": "*", "÷": "/", "−": "-"})


class CalculatorError(QuillError):
    """An expression the calculator refuses: a syntax error, a division by zero, a bound."""


def _bits(value: Fraction) -> int:
    return max(abs(value.numerator).bit_length(), value.denominator.bit_length())


def _checked(value: Fraction) -> Fraction:
    if _bits(value) > MAX_BITS:
        raise CalculatorError(f"a number on the way has more than {MAX_DIGITS} digits")
    return value


def _tokens(expression: str) -> list[str]:
    text = expression.translate(SYNONYMS)
    out, pos = [], 0
    while pos < len(text):
        m = TOKEN.match(text, pos)
        if m is None:
            if text[pos:].strip() == "":
                break
            bad = text[pos:].lstrip()[0]
            raise CalculatorError(f"unexpected {bad!r} at position {len(text) - len(text[pos:].lstrip())}: "
                                  f"numbers, + - * / // % ** ^ and parentheses only")
        out.append(m.group(1) or m.group(2))
        pos = m.end()
    return out


class _Parser:
    """Recursive descent over the tokens; each method parses one rule of the grammar."""

    def __init__(self, tokens: list[str]):
        self.tokens, self.pos, self.depth = tokens, 0, 0

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> str:
        token = self.peek()
        if token is None:
            raise CalculatorError("the expression ends too early")
        self.pos += 1
        return token

    def nested(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise CalculatorError(f"nested more than {MAX_DEPTH} deep")

    def expr(self) -> Fraction:
        value = self.term()
        while self.peek() in ("+", "-"):
            op = self.take()
            right = self.term()
            value = _checked(value + right if op == "+" else value - right)
        return value

    def term(self) -> Fraction:
        value = self.unary()
        while self.peek() in ("*", "/", "//", "%"):
            op = self.take()
            right = self.unary()
            if op == "*":
                if _bits(value) + _bits(right) > MAX_BITS + 1:
                    raise CalculatorError(f"the product would have more than {MAX_DIGITS} digits")
                value = _checked(value * right)
                continue
            if right == 0:
                raise CalculatorError("division by zero")
            value = _checked(value / right if op == "/" else Fraction(value // right) if op == "//"
                             else value % right)
        return value

    def unary(self) -> Fraction:
        if self.peek() in ("+", "-"):
            op = self.take()
            self.nested()
            value = self.unary()
            self.depth -= 1
            return -value if op == "-" else value
        return self.power()

    def power(self) -> Fraction:
        base = self.atom()
        if self.peek() not in ("**", "^"):
            return base
        self.take()
        self.nested()
        exponent = self.unary()
        self.depth -= 1
        return _power(base, exponent)

    def atom(self) -> Fraction:
        token = self.take()
        if token == "(":
            self.nested()
            value = self.expr()
            self.depth -= 1
            if self.peek() != ")":
                raise CalculatorError("a parenthesis is not closed")
            self.take()
            return value
        if token[0].isdigit() or token[0] == ".":
            if len(token) > MAX_DIGITS:
                raise CalculatorError(f"a number has more than {MAX_DIGITS} digits")
            return Fraction(token)
        raise CalculatorError(f"expected a number or '(', got {token!r}")


def _power(base: Fraction, exponent: Fraction) -> Fraction:
    if exponent.denominator != 1:
        raise CalculatorError("the exponent must be an integer")
    n = exponent.numerator
    if base == 0 and n < 0:
        raise CalculatorError("division by zero")
    if base in (0, 1) or n == 0:
        return Fraction(1) if n == 0 else base
    if base == -1:
        return Fraction(1 if n % 2 == 0 else -1)
    # the result's size is about |n| times the base's: refuse before computing it
    size = abs(n) * max(_bits(base) - 1, 1)
    if size > MAX_BITS:
        digits = abs(n) * max(math.log10(abs(base.numerator)), math.log10(base.denominator))
        digits = f"{digits:,.0f}" if digits < 1e30 else "astronomically many"
        raise CalculatorError(f"the result would have about {digits} digits (at most {MAX_DIGITS})")
    return _checked(base**n)


def format_number(value: Fraction) -> str:
    """An integer as itself; anything else as a decimal of up to SIGNIFICANT digits."""
    if value.denominator == 1:
        return str(value.numerator)
    with localcontext() as ctx:
        ctx.prec = SIGNIFICANT
        d = (Decimal(value.numerator) / Decimal(value.denominator)).normalize()
    return format(d, "f") if -30 < d.adjusted() < SIGNIFICANT else format(d, "E")


def evaluate(expression: str) -> Fraction:
    """The exact value of `expression` (module docstring), or CalculatorError saying why not."""
    if not isinstance(expression, str):
        raise CalculatorError(f"the expression must be a string, got {shown(expression)}")
    if len(expression) > MAX_CHARS:
        raise CalculatorError(f"the expression is longer than {MAX_CHARS} characters")
    tokens = _tokens(expression)
    if not tokens:
        raise CalculatorError("the expression is empty")
    parser = _Parser(tokens)
    value = parser.expr()
    if parser.pos != len(tokens):
        raise CalculatorError(f"unexpected {tokens[parser.pos]!r} after a complete expression")
    return value


def calculate(expression: str) -> str:
    """`expression` evaluated and written as a number (module docstring)."""
    return format_number(evaluate(expression))
