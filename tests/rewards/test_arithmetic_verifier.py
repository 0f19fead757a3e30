import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from nemo_gdro.rewards.arithmetic import ArithmeticVerifier


@pytest.fixture(scope="module")
def v() -> ArithmeticVerifier:
    return ArithmeticVerifier()


@pytest.mark.parametrize(
    "response,answer,ok",
    [
        ("82", "82", True),
        ("  82 ", "82", True),
        ("+82", "82", True),
        ("82\nQ:1+1=A:2", "82", True),  # only the text before the newline counts
        ("82<eos>garbage", "82", True),
        ("082", "82", True),  # equal as an integer
        ("-42", "-42", True),
        ("-0", "0", True),
        ("42", "-42", False),
        ("83", "82", False),
        ("8 2", "82", False),
        ("82.0", "82", False),
        ("82a", "82", False),
        ("A:82", "82", False),
        ("+ 82", "82", False),
        ("", "82", False),
        ("\n82", "82", False),
        ("<pad>82", "82", False),
        ("8<bos>2", "82", False),
        ("\ufffd", "82", False),
        ("٨٢", "82", False),  # non-ASCII digits are not accepted
        ("9" * 5000, "82", False),  # huge literal: no int-conversion error
    ],
)
def test_hand_cases(v, response, answer, ok):
    assert v.is_correct(response, answer) is ok
    assert v.score(response, answer) == (1.0 if ok else 0.0)


@given(st.text(max_size=60))
def test_garbage_never_raises(text):
    v = ArithmeticVerifier()
    assert v.score(text, "17") in (0.0, 1.0)


def test_non_string_response_is_wrong(v):
    assert v.score(None, "1") == 0.0  # type: ignore[arg-type]
    assert v.score(b"1", "1") == 0.0  # type: ignore[arg-type]


def test_score_batch_row_aligned():
    v = ArithmeticVerifier(correct_reward=1.0, wrong_reward=-1.0)
    out = v.score_batch(["3", "4", "x", "-5"], ["3", "5", "1", "-5"])
    assert out.dtype == torch.float32
    assert out.tolist() == [1.0, -1.0, -1.0, 1.0]
    assert v.reward_range == (-1.0, 1.0)
    with pytest.raises(ValueError, match="2 texts but 1 answers"):
        v.score_batch(["1", "2"], ["1"])


def test_bad_ground_truth_and_config_raise(v):
    with pytest.raises(ValueError, match="ground-truth"):
        v.score("1", "one")
    with pytest.raises(ValueError, match="correct_reward"):
        ArithmeticVerifier(correct_reward=0.0, wrong_reward=0.0)
