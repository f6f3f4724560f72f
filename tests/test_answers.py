"""Math reference answers as datasets write them: LaTeX, numbers, intervals, tuples, unicode, money, grouping.

Each row is a gold answer as it appears in a dataset's answer column and a model's `\\boxed{}` answer, with the reward
math_reward must give. The rows marked "rewritten" were misread before `vibeperf.rewards.answers` (the equivalent
answer scored 0); the rest pin down what math-verify reads on its own, so a rewrite rule cannot break them; the
wrong answers check that no rule makes different values equal.
"""

from __future__ import annotations

import pytest

from vibeperf.rewards import math_reward
from vibeperf.rewards.answers import normalize_answer

ANSWERS = [
    # numbers
    ("integer", "42", r"\boxed{42}", 1.0),
    ("integer-padded", " 42\n", r"\boxed{42}", 1.0),
    ("decimal-trailing-zero", "3.50", r"\boxed{3.5}", 1.0),
    ("thousands-comma", "1,000", r"\boxed{1000}", 1.0),
    ("thousands-braced-comma", "1{,}000", r"\boxed{1000}", 1.0),
    ("rewritten-thousands-thin-space", r"1\,000", r"\boxed{1000}", 1.0),
    ("rewritten-thousands-spaces", "1 000 000", r"\boxed{1000000}", 1.0),
    ("rewritten-e-notation", "1.2e3", r"\boxed{1200}", 1.0),
    ("rewritten-e-notation-negative", "1e-3", r"\boxed{0.001}", 1.0),
    ("rewritten-final-period", "7.", r"\boxed{7}", 1.0),
    ("unicode-minus", "\u22125", r"\boxed{-5}", 1.0),
    ("percent", r"10\%", r"\boxed{10}", 1.0),
    # LaTeX
    ("frac-vs-decimal", r"\dfrac{3}{4}", r"\boxed{0.75}", 1.0),
    ("inline-delimiters", r"\(\frac{1}{2}\)", r"\boxed{0.5}", 1.0),
    ("dollar-delimiters", r"$\frac{\sqrt{3}}{2}$", r"\boxed{\frac{\sqrt3}{2}}", 1.0),
    ("sqrt-simplified", r"2\sqrt{2}", r"\boxed{\sqrt{8}}", 1.0),
    ("pi-fraction", r"\pi/2", r"\boxed{\frac{\pi}{2}}", 1.0),
    ("degrees", r"45^\circ", r"\boxed{45}", 1.0),
    ("text-unit", r"5 \text{ cm}", r"\boxed{5}", 1.0),
    ("rewritten-text-wrapped-number", r"\text{5 cm}", r"\boxed{5}", 1.0),
    ("rewritten-repeating-decimal", r"0.\overline{3}", r"\boxed{\frac13}", 1.0),
    ("rewritten-repeating-decimal-mixed", r"1.1\overline{6}", r"\boxed{\frac{7}{6}}", 1.0),
    ("polynomial", "x^2+2x+1", r"\boxed{(x+1)^2}", 1.0),
    # unicode
    ("rewritten-unicode-sqrt", "\u221a2", r"\boxed{\sqrt2}", 1.0),
    ("rewritten-unicode-half", "\u00bd", r"\boxed{0.5}", 1.0),
    ("rewritten-unicode-degree", "90\u00b0", r"\boxed{90}", 1.0),
    ("rewritten-approx", "\u22483.14", r"\boxed{3.14}", 1.0),
    # money
    ("rewritten-escaped-dollar", r"\$12.50", r"\boxed{12.5}", 1.0),
    ("rewritten-escaped-dollar-thousands", r"\$1,000", r"\boxed{1000}", 1.0),
    ("lone-dollar", "$12.50", r"\boxed{12.5}", 1.0),
    ("rewritten-euro", "\u20ac5", r"\boxed{5}", 1.0),
    ("rewritten-currency-code", "5 USD", r"\boxed{5}", 1.0),
    # intervals
    ("interval-half-open", "(1, 2]", r"\boxed{(1,2]}", 1.0),
    ("interval-membership", r"x \in [2, 5)", r"\boxed{[2,5)}", 1.0),
    ("interval-inequality", r"2 < x \le 5", r"\boxed{(2,5]}", 1.0),
    ("interval-left-right", r"\left[ 1, 2 \right)", r"\boxed{[1,2)}", 1.0),
    ("interval-union", r"(-\infty, 0) \cup (1, \infty)", r"\boxed{(-\infty,0)\cup(1,\infty)}", 1.0),
    ("rewritten-interval-unicode-infinity", "(-\u221e, 3]", r"\boxed{(-\infty,3]}", 1.0),
    # tuples and sets
    ("tuple", "(2, 3)", r"\boxed{(2,3)}", 1.0),
    ("tuple-named", "a=1, b=2", r"\boxed{(1,2)}", 1.0),
    ("tuple-semicolon", "(1; 2)", r"\boxed{(1,2)}", 1.0),
    ("rewritten-tuple-angle-brackets", r"\langle 1, 2 \rangle", r"\boxed{(1,2)}", 1.0),
    ("set-order", r"\{-2, 3\}", r"\boxed{3,-2}", 1.0),
    ("plus-minus", r"\pm 2", r"\boxed{2,-2}", 1.0),
    ("unicode-plus-minus", "\u00b12", r"\boxed{2,-2}", 1.0),
    ("boxed-gold", r"$\boxed{7}$", r"\boxed{7}", 1.0),
    # wrong answers stay wrong
    ("wrong-interval-closed-end", "(1,2]", r"\boxed{(1,2)}", 0.0),
    ("wrong-tuple-order", "(1,2,3)", r"\boxed{(3,2,1)}", 0.0),
    ("wrong-money", r"\$12.50", r"\boxed{12.05}", 0.0),
    ("wrong-grouping", "1 000", r"\boxed{100}", 0.0),
    ("wrong-repeating-decimal", r"0.\overline{3}", r"\boxed{0.33}", 0.0),
    ("wrong-e-notation", "1.2e3", r"\boxed{120}", 0.0),
    ("wrong-unicode-sqrt", "\u221a2", r"\boxed{2}", 0.0),
]


@pytest.mark.parametrize("gold,completion,reward", [a[1:] for a in ANSWERS], ids=[a[0] for a in ANSWERS])
def test_real_style_answers(gold, completion, reward):
    result = math_reward(gold, completion)
    assert result.reward == reward, result


REWRITTEN = [a for a in ANSWERS if a[0].startswith("rewritten-")]


@pytest.mark.parametrize("gold,completion", [a[1:3] for a in REWRITTEN], ids=[a[0] for a in REWRITTEN])
def test_rewritten_rows_need_the_rewrite(gold, completion, monkeypatch):
    """Without the rewrite, math-verify scores these equivalent answers 0: each rule is needed by a row."""
    from vibeperf.rewards import math as math_module

    monkeypatch.setattr(math_module, "normalize_answer", lambda text: text)
    assert math_reward(gold, completion).reward == 0.0


@pytest.mark.parametrize(
    "raw,rewritten",
    [
        (r"\$1,000", "1,000"),
        ("1 000 000", "1000000"),
        ("1e-3", "0.001"),
        (r"-0.1\overline{6}", r"-\frac{1}{6}"),
        (r"2.\overline{9}", "3"),
        ("\u221a(x+1)", r"\sqrt{(x+1)}"),
        ("12 dollars", "12"),
        (r"\frac{1}{2}", r"\frac{1}{2}"),
        ("(1, 2]", "(1, 2]"),
        ("$x$", "$x$"),
    ],
)
def test_normalize_answer(raw, rewritten):
    assert normalize_answer(raw) == rewritten
