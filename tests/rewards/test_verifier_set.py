"""VerifierSet: the run's verifiers by answer type, one pool per type, closed together."""

import pytest

from nemo_gdro.rewards.pool import PooledVerifier
from nemo_gdro.rewards.registry import RewardConfig
from nemo_gdro.rewards.verifier_set import VerifierSet


def test_answer_types_share_one_pool_each_and_close_together():
    with VerifierSet(RewardConfig(verifier="arithmetic", num_workers=2)) as vs:
        math = vs.for_answer_type("math")
        assert isinstance(math, PooledVerifier) and vs.for_answer_type("math") is math
        assert not math.uses_workers  # decided by string work: no processes
        assert math.verify_batch(["12", "13"], ["12", "12"]).correct.tolist() == [True, False]
        choice = vs.for_answer_type("choice")
        assert choice.cfg.verifier == "gpqa_choice" and choice.verify_batch(["Answer: B"], ["B"]).correct.tolist() == [True]
        with pytest.raises(ValueError, match="no verifier for answer type 'free'; known answer types: math, choice"):
            vs.for_answer_type("free")
    assert math._closed and choice._closed
    with pytest.raises(RuntimeError, match="after close"):
        vs.for_answer_type("math")


def test_bad_choice_verifier_is_named():
    with pytest.raises(ValueError, match="reward.choice_verifier: unknown verifier 'nope'"):
        VerifierSet(RewardConfig(verifier="arithmetic"), choice_verifier="nope")
