"""The divergence guard's decisions and the non-finite search."""

from __future__ import annotations

import math

import pytest
import torch

from nemo_gdro.trainer.errors import NonFiniteError
from nemo_gdro.trainer.guards import UpdateGuard, first_nonfinite, sampling_failure


def test_stop_names_the_step_and_what_was_not_finite():
    guard = UpdateGuard("stop")
    assert guard.allow(3, 0.5, True)
    with pytest.raises(NonFiniteError, match=r"step 4: non-finite loss \(loss nan\); the update was not applied"):
        guard.allow(4, math.nan, True)
    with pytest.raises(NonFiniteError, match=r"step 5: non-finite loss and gradients"):
        guard.allow(5, math.inf, False)
    with pytest.raises(NonFiniteError, match=r"step 6: non-finite gradients"):
        guard.allow(6, 1.0, False)


def test_skip_counts_and_stops_after_too_many_in_a_row():
    guard = UpdateGuard("skip", max_consecutive=2)
    assert not guard.allow(1, math.nan, True)
    assert guard.allow(2, 0.1, True)  # a good step resets the run of skips
    assert not guard.allow(3, 0.1, False) and not guard.allow(3, math.nan, True)
    assert guard.skipped_total == 3 and guard.consecutive == 2
    with pytest.raises(NonFiniteError, match=r"3 optimizer steps in a row \(trainer\.max_consecutive_skips=2\)"):
        guard.allow(4, math.nan, True)
    restored = UpdateGuard("skip", max_consecutive=2)
    restored.load_state_dict(guard.state_dict())
    assert restored.state_dict() == guard.state_dict()
    with pytest.raises(NonFiniteError, match="overflow"):
        guard.check_weights(5, False)


def test_first_nonfinite_finds_the_path():
    state = {"model": {"w": torch.ones(3), "b": torch.tensor([1.0, math.inf])}, "optimizer": [{"step": 3}]}
    assert first_nonfinite(state) == "model.b"
    assert first_nonfinite({"x": torch.arange(3), "y": [1.0, {"z": torch.zeros(2)}]}) is None
    assert first_nonfinite({"lr": [0.1, math.nan]}) == "lr.1"


def test_sampling_failures_become_one_line():
    err = RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
    assert "step 7: generation failed on non-finite sampling probabilities" in str(sampling_failure(err, 7, "generation"))
    assert sampling_failure(RuntimeError("CUDA out of memory"), 7, "generation") is None
