"""Reference answers as datasets write them, rewritten into LaTeX that math-verify reads (`normalize_answer`).

math-verify already reads most answer columns as they are: plain and LaTeX numbers, fractions, `\\boxed{}` and `$...$`,
intervals (`(1, 2]`, `x \\in [2, 5)`, `2 < x \\le 5`), tuples and sets (`(1, 2)`, `a=1, b=2`, `\\{1, 2\\}`), `\\pm`,
`\\text{ cm}` units, `45^\\circ`. What it misreads, and this module rewrites (only what a rule matches; anything else
passes through unchanged):

- Unicode math: `√2`, `π`, `∞`, `−`, `×`, `÷`, `≤`, `≥`, `∪`, `±`, `°`, `½` and the other vulgar fractions, a leading
  `≈`, `\\approx` (the gold is the value it approximates).
- Money: `\\$12.50`, `€5`, `5 USD`, `12 dollars` (math-verify reads a plain `$12.50` itself).
- Digit grouping: `1\\,000`, `1\\!000`, `1 000 000`, `1~000` (`1,000` and `1{,}000` already read as 1000).
- Scientific E notation: `1.2e3`, `1e-3` (written out as a decimal).
- Repeating decimals: `0.\\overline{3}`, `1.1\\overline{6}` (rewritten as the exact fraction).
- Angle-bracket vectors `\\langle 1, 2 \\rangle` (read as tuples), a number wrapped whole in `\\text{}` / `\\mathrm{}`
  (`\\text{5 cm}`), and a sentence's final period after a number (`7.`).
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from fractions import Fraction

_UNICODE = {
    "\u2212": "-", "\u2013": "-", "\u00d7": r"\times ", "\u00f7": r"\div ", "\u22c5": r"\cdot ", "\u00b7": r"\cdot ",
    "\u03c0": r"\pi ", "\u221e": r"\infty ", "\u2264": r"\le ", "\u2265": r"\ge ", "\u2260": r"\ne ",
    "\u222a": r"\cup ", "\u2229": r"\cap ", "\u2205": r"\emptyset ", "\u00b1": r"\pm ", "\u00b0": r"^\circ ",
    "\u00bd": r"\frac{1}{2}", "\u2153": r"\frac{1}{3}", "\u2154": r"\frac{2}{3}", "\u00bc": r"\frac{1}{4}",
    "\u00be": r"\frac{3}{4}", "\u2155": r"\frac{1}{5}", "\u2159": r"\frac{1}{6}", "\u215b": r"\frac{1}{8}",
}  # fmt: skip
_SQRT = re.compile(r"\u221a\s*(\d+(?:\.\d+)?|[A-Za-z]|\([^()]*\)|\{[^{}]*\})")
_APPROX = re.compile(r"^(?:\u2248|\\approx)\s*")
_CURRENCY = re.compile(r"\\\$|[\u20ac\u00a3\u00a5]")
_CURRENCY_WORD = re.compile(r"\s*(?:USD|EUR|GBP|dollars?|euros?)\.?$")
_GROUP_SEP = re.compile(r"(?<=\d)(?:\\[,!;: ]|~|\{,\})(?=\d{3}(?!\d))")
_SPACED_GROUPS = re.compile(r"^[-+]?\d{1,3}(?: \d{3})+(?:\.\d+)?$")
_SCIENTIFIC = re.compile(r"^[-+]?\d+(?:\.\d+)?[eE][-+]?\d+$")
_REPEATING = re.compile(r"^([-+]?)(\d*)\.(\d*)\\overline\s*\{(\d+)\}$")
_ANGLE = re.compile(r"\\langle\s*(.*?)\s*\\rangle")
_TEXT_NUMBER = re.compile(r"^\\(?:text|textrm|textbf|mathrm|mbox)\s*\{\s*([-+]?\d[^{}]*)\}$")
_FINAL_PERIOD = re.compile(r"(?<=\d)\.$")


def _repeating(sign: str, whole: str, fixed: str, period: str) -> str:
    """sign whole.fixed(period)... as an exact LaTeX fraction."""
    value = Fraction(int(whole or "0")) + Fraction(int(fixed or "0"), 10 ** len(fixed))
    value += Fraction(int(period), (10 ** len(period) - 1) * 10 ** len(fixed))
    sign = "-" if sign == "-" and value else ""
    if value.denominator == 1:
        return f"{sign}{value.numerator}"
    return rf"{sign}\frac{{{value.numerator}}}{{{value.denominator}}}"


def normalize_answer(answer: str) -> str:
    """`answer` rewritten by the rules of the module docstring (unchanged where none applies)."""
    text = str(answer).strip()
    text = _SQRT.sub(r"\\sqrt{\1}", text)
    for char, latex in _UNICODE.items():
        text = text.replace(char, latex)
    text = _APPROX.sub("", text).strip()
    text = _CURRENCY_WORD.sub("", _CURRENCY.sub("", text)).strip()
    text = _GROUP_SEP.sub("", text)
    if _SPACED_GROUPS.match(text):
        text = text.replace(" ", "")
    if _SCIENTIFIC.match(text):
        try:
            text = format(Decimal(text).normalize(), "f")
        except InvalidOperation:
            pass
    if m := _REPEATING.match(text):
        text = _repeating(*m.groups())
    text = _ANGLE.sub(r"(\1)", text)
    if m := _TEXT_NUMBER.match(text):
        text = m.group(1).strip()
    return _FINAL_PERIOD.sub("", text.strip())
