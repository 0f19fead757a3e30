import pytest

from nemo_gdro.rewards.base import GroundTruthError
from nemo_gdro.rewards.choice import ChoiceVerifier


@pytest.fixture(scope="module")
def v() -> ChoiceVerifier:
    return ChoiceVerifier()


@pytest.mark.parametrize(
    "response,gold,ok",
    [
        ("The energy difference is about 4.2 eV, which matches option B.\n\nAnswer: B", "B", True),
        ("Answer: (C)", "C", True),
        ("...so the right choice is \\boxed{D}", "D", True),
        ("The answer is (A).", "A", True),
        ("Answer: B", "C", False),
        ("Answer: B", "(b)", True),  # ground truth in another common spelling
        ("I am not sure.", "A", False),
        ("", "A", False),
        ("Answer: C\n\nWait, reconsidering.\nAnswer: A", "A", True),
    ],
)
def test_choice_verifier(v, response, gold, ok):
    assert v.is_correct(response, gold) is ok


def test_every_row_is_decided_in_prepare(v):
    assert v.prepare("Answer: A", "A") is True
    assert v.prepare("Answer: B", "A") is False


def test_batch_rewards_and_bad_ground_truth():
    v = ChoiceVerifier(correct_reward=1.0, wrong_reward=-1.0)
    assert v.score_batch(["Answer: A", "Answer: B"], ["A", "A"]).tolist() == [1.0, -1.0]
    with pytest.raises(GroundTruthError, match="row 1.*letters 'ABCD'"):
        v.verify_batch(["Answer: A", "Answer: B"], ["A", "E"])


def test_options_validated():
    with pytest.raises(ValueError, match="reward.options.letters"):
        ChoiceVerifier(letters="abcd")
    with pytest.raises(ValueError, match="reward.options.letters"):
        ChoiceVerifier(letters="AAB")
    with pytest.raises(ValueError, match="reward.options.tail_chars"):
        ChoiceVerifier(tail_chars=0)
    assert ChoiceVerifier(letters="ABCDE").is_correct("Answer: E", "E")
