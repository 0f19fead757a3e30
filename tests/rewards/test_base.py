"""The Verifier base class: prepare/check split, batch accounting, VerifyResult."""

import pytest
import torch

from nemo_gdro.rewards.arithmetic import ArithmeticVerifier
from nemo_gdro.rewards.base import GroundTruthError, Verifier, WorkItem
from nemo_gdro.rewards.result import STATUS_FAILURE, STATUS_OK, STATUS_TIMEOUT, VerifyResult


class _FlakyChecker(Verifier):
    """Exercises the base class's accounting: ``check`` raises on a marker, like a verifier bug."""

    def prepare(self, response_text, answer):
        return response_text == answer if response_text.isdigit() else WorkItem(response_text, answer)

    def check(self, item):
        if item.prediction == "boom":
            raise RuntimeError("verifier bug")
        return item.prediction.strip() == item.answer


def test_verify_batch_counts_failures_and_keeps_row_order():
    v = _FlakyChecker(correct_reward=1.0, wrong_reward=-1.0)
    res = v.verify_batch(["1", "boom", " 2", "3"], ["1", "2", "2", "4"])
    assert res.correct.tolist() == [True, False, True, False]
    assert res.status.tolist() == [STATUS_OK, STATUS_FAILURE, STATUS_OK, STATUS_OK]
    assert (res.failures, res.timeouts) == (1, 0)
    assert v.rewards(res).tolist() == [1.0, -1.0, 1.0, -1.0]
    assert v.is_correct(" 2", "2") is True


def test_ground_truth_error_names_the_row():
    v = ArithmeticVerifier()
    with pytest.raises(GroundTruthError, match="row 2: arithmetic ground-truth") as e:
        v.verify_batch(["1", "2", "3"], ["1", "2", "three"])
    assert isinstance(e.value, ValueError)


def test_a_verifier_must_implement_something():
    with pytest.raises(NotImplementedError, match="neither is_correct nor check"):
        Verifier().is_correct("1", "1")
    with pytest.raises(NotImplementedError):
        Verifier().check(WorkItem("1", "1"))


def test_verify_result():
    res = VerifyResult.from_rows([True, False, False, True], [0, 1, 2, 0], wall_s=0.25, worker_restarts=1)
    assert res.correct.dtype == torch.bool and res.status.dtype == torch.int8
    assert (res.timeouts, res.failures) == (1, 1)
    assert res.rewards(1.0, 0.0).tolist() == [1.0, 0.0, 0.0, 1.0]
    assert res.rewards(1.0, -1.0).dtype == torch.float32
    m = res.metrics()
    assert m == {
        "reward/timeouts": 1.0,
        "reward/failures": 1.0,
        "reward/timeout_frac": 0.25,
        "reward/verify_s": 0.25,
        "reward/worker_restarts": 1.0,
    }
    assert STATUS_TIMEOUT == 1


def test_reward_values_validated():
    with pytest.raises(ValueError, match="correct_reward"):
        Verifier(correct_reward=0.0, wrong_reward=0.0)
