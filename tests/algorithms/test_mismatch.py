import math

import pytest
import torch

from nemo_gdro.algorithms.mismatch import (
    MismatchSums,
    logprob_mismatch,
    mismatch_sums,
    truncated_is_weights,
)

ACTOR = torch.tensor([[-1.0, -2.0, -0.5, 0.0], [-3.0, -1.0, 0.0, 0.0]], dtype=torch.float64)
ENGINE = torch.tensor([[-1.5, -2.0, -0.1, 9.0], [-1.0, -1.2, 0.0, 7.0]], dtype=torch.float64)
MASK = torch.tensor([[True, True, True, False], [True, True, False, False]])
# masked d = actor - engine: 0.5, 0.0, -0.4, -2.0, 0.2


def test_hand_computed_statistics():
    st = logprob_mismatch(ACTOR, ENGINE, MASK)
    d = [0.5, 0.0, -0.4, -2.0, 0.2]
    assert st.num_tokens == 5
    assert st.token_mult_prob_error == pytest.approx(sum(math.exp(abs(x)) for x in d) / 5, rel=1e-12)
    assert st.mean_abs_logp_diff == pytest.approx(3.1 / 5, rel=1e-12)
    assert st.max_abs_logp_diff == pytest.approx(2.0)
    assert st.mean_logp_diff == pytest.approx(-1.7 / 5, rel=1e-12)
    m = st.as_metrics()
    assert m["rollout/engine_token_mult_prob_error"] == st.token_mult_prob_error


def test_identical_and_empty():
    st = logprob_mismatch(ACTOR, ACTOR.clone(), MASK)
    assert (st.token_mult_prob_error, st.mean_abs_logp_diff, st.max_abs_logp_diff) == (1.0, 0.0, 0.0)
    empty = logprob_mismatch(ACTOR, ENGINE, torch.zeros_like(MASK))
    assert empty.num_tokens == 0 and empty.token_mult_prob_error == 1.0
    assert logprob_mismatch(ACTOR, ENGINE).num_tokens == 8  # no mask: every position


def test_sums_reduce_like_one_batch():
    # Two "ranks" holding one row each, summed (and max-ed) as an all-reduce would.
    a = mismatch_sums(ACTOR[:1], ENGINE[:1], MASK[:1])
    b = mismatch_sums(ACTOR[1:], ENGINE[1:], MASK[1:])
    merged = MismatchSums(a.sums + b.sums, torch.maximum(a.max_abs, b.max_abs)).finalize()
    assert merged == logprob_mismatch(ACTOR, ENGINE, MASK)


def test_truncated_is_weights_hand_computed():
    w = truncated_is_weights(ACTOR, ENGINE, MASK, cap=1.5)
    expected = torch.tensor(
        [[math.exp(0.5), 1.0, math.exp(-0.4), 0.0], [math.exp(-2.0), math.exp(0.2), 0.0, 0.0]]
    )
    expected[0, 0] = 1.5  # exp(0.5) = 1.65 truncated at C
    assert w.dtype == torch.float32
    assert torch.allclose(w, expected.float(), atol=1e-7, rtol=0)
    # default cap 2; huge gaps never overflow
    big = truncated_is_weights(torch.tensor([[1000.0, -1000.0]]), torch.tensor([[0.0, 0.0]]))
    assert big.tolist() == [[2.0, 0.0]]


def test_weights_carry_no_gradient():
    a = ACTOR.clone().requires_grad_(True)
    assert not truncated_is_weights(a, ENGINE, MASK).requires_grad


def test_bad_inputs():
    with pytest.raises(ValueError, match="same shape"):
        logprob_mismatch(ACTOR, ENGINE[:, :3], None)
    with pytest.raises(ValueError, match="mask must be bool"):
        logprob_mismatch(ACTOR, ENGINE, MASK.float())
    with pytest.raises(ValueError, match="cap"):
        truncated_is_weights(ACTOR, ENGINE, MASK, cap=0.0)


def test_row_sums_add_up_to_the_batch_sums():
    """Per-row partial sums (what a training forward reports per row) give the same statistics."""
    from nemo_gdro.algorithms.mismatch import MismatchSums, mismatch_row_sums, mismatch_sums

    g = torch.Generator().manual_seed(3)
    actor, engine = -torch.rand(5, 7, generator=g), -torch.rand(5, 7, generator=g)
    mask = torch.rand(5, 7, generator=g) > 0.4
    mask[2] = False  # a row without response tokens
    whole = mismatch_sums(actor, engine, mask)
    rows = MismatchSums.from_rows(mismatch_row_sums(actor, engine, mask))
    torch.testing.assert_close(rows.sums, whole.sums)
    torch.testing.assert_close(rows.max_abs, whole.max_abs)
    assert rows.finalize().as_metrics() == pytest.approx(whole.finalize().as_metrics())
