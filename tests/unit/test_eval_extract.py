"""Answer extraction on the strings that trip scorers up: commas, dollars, negatives, decimals, boxed LaTeX."""

import pytest

from loopfit.eval.accuracy import score_gsm8k as score
from loopfit.eval.extract import (
    flexible_answer,
    gsm8k_reference,
    last_boxed,
    math_answer,
    math_equal,
    normalize_number,
    strict_answer,
)


@pytest.mark.parametrize("text, strict, flexible", [
    ("She pays 3 * $4 = $12. The answer is $1,234.", "1234", "1234"),
    ("5 - 7 = -2\n#### -2", "-2", "-2"),
    ("So 0.5 * 9 = 4.50. The answer is 4.50.", "4.5", "4.5"),
    ("The answer is 18. Then 7 more", "18", "7"),             # strict reads the stated answer, flexible the last number
    ("He has 3 apples and 12 pears.", None, "12"),            # no stated answer: strict fails, flexible succeeds
    ("#### 1,000,000", "1000000", "1000000"),
    ("The final answer is: -0.25", "-0.25", "-0.25"),
    ("The answer is 007.", "7", "7"),
    ("no digits here", None, None),
    ("The answer is 5.\n#### 6", "6", "6"),                   # the last stated answer wins
    ("costs $3.", None, "3"),
])
def test_gsm8k_strict_and_flexible(text, strict, flexible):
    assert strict_answer(text) == strict
    assert flexible_answer(text) == flexible


def test_numbers_normalize_like_references():
    assert normalize_number("$1,234.00") == "1234"
    assert normalize_number("-0.0") == "0"
    assert normalize_number(".5") == "0.5"
    assert normalize_number("12.") == "12"
    assert normalize_number("1.2.3") is None
    assert gsm8k_reference("Janet sells 9 eggs.\n#### 1,800") == "1800"


def test_score_counts_strict_and_flexible_separately():
    assert score("16 - 3 - 4 = 9 eggs, 9 * 2 = $18. The answer is 18.", "18") == {"strict": 1.0, "flexible": 1.0}
    assert score("9 * 2 = 18 dollars", "18") == {"strict": 0.0, "flexible": 1.0}
    assert score("The answer is 17. Check: 18", "18") == {"strict": 0.0, "flexible": 1.0}


@pytest.mark.parametrize("text, boxed", [
    (r"so $x = \boxed{\frac{1}{2}}$.", r"\frac{1}{2}"),
    (r"\boxed{1} first, then \boxed{\sqrt{\frac{a}{b}}}", r"\sqrt{\frac{a}{b}}"),
    (r"\fbox{(2,3]}", "(2,3]"),
    (r"\boxed 5$", "5"),
    (r"\boxed{\frac{1}{2}", None),  # unbalanced: no answer rather than a wrong one
    ("nothing boxed", None),
])
def test_last_boxed(text, boxed):
    assert last_boxed(text) == boxed


def test_math_answer_falls_back_to_minerva_final_answer():
    assert math_answer(r"... Final Answer: The final answer is $\frac{2}{3}$. I hope it is correct.") == r"\frac{2}{3}"
    assert math_answer(r"we get $\boxed{24}$.\nFinal Answer: The final answer is $25$.") == "24"
    assert math_answer("I give up") is None


@pytest.mark.parametrize("pred, ref, equal", [
    (r"\frac{1}{2}", "0.5", True),
    (r"\dfrac12", r"\frac{1}{2}", True),
    (r"\frac{2}{4}", r"\frac{1}{2}", True),
    ("2", r"\frac{1}{2}", False),
    (r"[2,5)", r"[2,5)", True),
    (r"[2,5]", r"[2,5)", False),
    (r"x^2+2x+1", r"(x+1)^2", True),
    (r"\sqrt{8}", r"2\sqrt{2}", True),
    (None, "3", False),
    ("}{", "3", False),
])
def test_math_equivalence_by_math_verify(pred, ref, equal):
    assert math_equal(pred, ref) is equal
