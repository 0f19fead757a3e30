import threading

import pytest
import torch

pytest.importorskip("math_verify")

from nemo_gdro.rewards.math import DapoMathVerifier, MathVerifier  # noqa: E402
from tests.rewards.cases import MODES, TABLE  # noqa: E402


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
    with pytest.raises(ValueError, match="timeout_s"):
        MathVerifier(timeout_s=True)
    with pytest.raises(ValueError, match="correct_reward"):
        MathVerifier(correct_reward=-1.0, wrong_reward=0.0)


# --------------------------------------------------------------------------- DapoMathVerifier

@pytest.fixture(scope="module")
def dapo_verifiers():
    return {m: DapoMathVerifier(extract=m) for m in MODES}


@pytest.mark.parametrize("mode", MODES)
def test_dapo_table(dapo_verifiers, mode):
    v = dapo_verifiers[mode]
    texts = [row[1] for row in TABLE]
    golds = [row[2] for row in TABLE]
    want = [row[3 + MODES.index(mode)] for row in TABLE]
    res = v.verify_batch(texts, golds)
    got = res.correct.tolist()
    wrong = [(TABLE[i][0], want[i], got[i]) for i in range(len(TABLE)) if got[i] != want[i]]
    assert not wrong, f"mode {mode}: (case, expected, got) {wrong}"
    assert res.timeouts == 0 and res.failures == 0
    assert all(v.is_correct(t, g) is w for t, g, w in zip(texts, golds, want, strict=True))


def test_dapo_prepare_decides_integers_without_sympy(dapo_verifiers):
    v = dapo_verifiers["dapo"]
    assert v.prepare("Answer: 12", "12") is True
    assert v.prepare("Answer: 13", "12") is False
    assert v.prepare("Answer: " + "7" * 5000, "12") is False  # 5000 digits: string compare, instant
    assert v.prepare("nothing", "12") is False
    item = v.prepare("Answer: \\frac{24}{2}", "12")
    assert not isinstance(item, bool) and item.prediction == "\\frac{24}{2}"
    assert v.check(item) is True


def test_dapo_rewards_plus_minus_one():
    v = DapoMathVerifier(correct_reward=1.0, wrong_reward=-1.0)
    assert v.score_batch(["Answer: 3", "Answer: 4"], ["3", "3"]).tolist() == [1.0, -1.0]
    assert v.reward_range == (-1.0, 1.0)


def test_dapo_options_validated():
    with pytest.raises(ValueError, match="reward.options.extract"):
        DapoMathVerifier(extract="last_line")
    with pytest.raises(ValueError, match="reward.options.tail_chars"):
        DapoMathVerifier(tail_chars=0)


def test_unparseable_ground_truth_is_a_counted_failure(dapo_verifiers):
    v = dapo_verifiers["dapo"]
    # An empty answer (a missing column value) and one math-verify finds nothing in.
    res = v.verify_batch(["Answer: \\frac{1}{2}", "Answer: \\frac{1}{2}", "Answer: 3"], ["", "\\", "3"])
    assert res.correct.tolist() == [False, False, True]
    assert (res.failures, res.timeouts) == (2, 0)
