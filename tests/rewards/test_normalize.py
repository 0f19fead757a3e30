import pytest

from nemo_gdro.rewards.math import precheck
from nemo_gdro.rewards.normalize import canonical_integer, normalize_answer, strip_variable_lhs


@pytest.mark.parametrize(
    "raw,normal",
    [
        ("$\\boxed{5}$.", "5"),
        ("**42**", "42"),
        (" 1,234 ", "1234"),
        ("1{,}000", "1000"),
        ("\\dfrac{1}{2}", "\\frac{1}{2}"),
        ("\\tfrac12", "\\frac12"),
        ("90^{\\circ}", "90"),
        ("90^\\circ", "90"),
        ("\\text{(B)}", "(B)"),
        ("\\left( 1, 2 \\right)", "(1,2)"),
        ("+7", "7"),
        ("\\$5", "5"),
        ("2*3", "2*3"),  # a product is not markdown
        ("1,2", "1,2"),  # not a grouped integer: a tuple stays a tuple
        ("\\boxed{1}+\\boxed{2}", "\\boxed{1}+\\boxed{2}"),  # two boxes: no unwrapping
    ],
)
def test_normalize_answer(raw, normal):
    assert normalize_answer(raw) == normal


def test_canonical_integer():
    assert canonical_integer("0012") == "12"
    assert canonical_integer("-000") == "0"
    assert canonical_integer("-7") == "-7"
    assert canonical_integer("1.0") is None and canonical_integer("") is None
    big = "9" * 5000
    assert canonical_integer(big) == big  # no int() and its 4300-digit limit


def test_strip_variable_lhs():
    assert strip_variable_lhs("x = 5") == "5"
    assert strip_variable_lhs("x_1=3") == "3"
    assert strip_variable_lhs("a=b=c") == "a=b=c"
    assert strip_variable_lhs("x==5") == "x==5"
    assert strip_variable_lhs("5") == "5"


@pytest.mark.parametrize(
    "pred,gold,verdict",
    [
        ("12", "12", True),
        ("012", "12", True),
        ("13", "12", False),  # both integers: decided without sympy
        ("9" * 5000, "12", False),
        ("1,000", "1000", True),
        ("0.50", "0.5", True),
        ("\\frac{1}{2}", "0.5", None),  # needs math-verify
        ("0.5", "\\frac{1}{2}", None),
        ("", "1", False),
        ("$ $", "1", False),
    ],
)
def test_precheck(pred, gold, verdict):
    assert precheck(pred, gold) is verdict
