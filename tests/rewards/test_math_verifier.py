import threading

import pytest
import torch

pytest.importorskip("math_verify")

from nemo_gdro.rewards.math import MathVerifier  # noqa: E402


@pytest.fixture(scope="module")
def v() -> MathVerifier:
    return MathVerifier()


@pytest.mark.parametrize(
    "response,answer,ok",
    [
        ("so the result is 0.5", r"\frac{1}{2}", True),
        (r"The answer is $\frac{1}{2}$.", "0.5", True),
        (r"Therefore \boxed{42}.", "42", True),
        (r"Therefore \boxed{42}.", r"\boxed{42}", True),
        (r"we get $\sqrt{2}$", r"\sqrt{2}", True),
        (r"Therefore \boxed{41}.", "42", False),
        (r"\boxed{\frac{1}{3}}", r"\frac{1}{2}", False),
        ("", "42", False),
        ("I don't know", "42", False),
    ],
)
def test_real_latex_answers(v, response, answer, ok):
    assert v.is_correct(response, answer) is ok


@pytest.mark.parametrize("garbage", ["\\boxed{", "$$$$", "\\frac{}{}{}", "\x00\xff{{{", "}" * 100, "\\" * 50])
def test_garbage_is_wrong_not_an_error(v, garbage):
    assert v.score(garbage, "42") == 0.0
    assert v.score("42", garbage) in (0.0, 1.0)  # malformed gold: no exception either


def test_signed_rewards_and_batch():
    v = MathVerifier(correct_reward=1.0, wrong_reward=-1.0)
    out = v.score_batch([r"\boxed{3}", r"\boxed{4}"], ["3", "3"])
    assert out.dtype == torch.float32 and out.tolist() == [1.0, -1.0]
    assert v.reward_range == (-1.0, 1.0)


def test_works_off_the_main_thread():
    # math-verify's signal-based timeouts would raise outside the main thread;
    # the verifier disables them there and still scores correctly.
    v = MathVerifier()
    results: list[float] = []
    t = threading.Thread(target=lambda: results.extend([v.score(r"\boxed{7}", "7"), v.score("8", "7")]))
    t.start()
    t.join()
    assert results == [1.0, 0.0]


def test_config_validation():
    with pytest.raises(ValueError, match="timeout_s"):
        MathVerifier(timeout_s=0)
    with pytest.raises(ValueError, match="correct_reward"):
        MathVerifier(correct_reward=-1.0, wrong_reward=0.0)
