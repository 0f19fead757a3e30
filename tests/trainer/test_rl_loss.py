"""The loop's per-micro-batch loss: micro-batch size changes nothing (grpo_base §5)."""

import pytest
import torch

from nemo_gdro.algorithms.dynamo_modulation import (
    DynamoModulationConfig,
    ModulationStats,
    modulation_stats,
)
from nemo_gdro.algorithms.losses import PolicyLossConfig, R2VPOConfig
from nemo_gdro.algorithms.token_stats import full_vocab_token_stats
from nemo_gdro.trainer.rl_loss import MinibatchLoss

R, L, V = 6, 5, 7


def make_rows(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(R, L, V, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, V, (R, L), generator=g)
    lengths = torch.tensor([5, 3, 4, 1, 5, 2])
    mask = torch.arange(L)[None, :] < lengths[:, None]
    behaviour = full_vocab_token_stats(logits + 0.3 * torch.randn(R, L, V, generator=g, dtype=torch.float64), tokens)[0]
    extras = {
        "response_mask": mask,
        "behaviour_logp": behaviour.detach(),
        "advantages": torch.randn(R, generator=g, dtype=torch.float64),
        "raw_advantages": torch.randn(R, generator=g, dtype=torch.float64),
        "row_index": torch.tensor([4, 0, 5, 1, 3, 2]),  # rows arrive shuffled
        "ref_logp": behaviour.detach() - 0.1,
    }
    return logits, tokens, extras


def run(split, *, r2vpo=None, modulation=None, kl_coef=0.0, agg="token-mean"):
    logits, tokens, extras = make_rows()
    logits.requires_grad_(True)
    policy = PolicyLossConfig(kl_coef=kl_coef, loss_agg_mode=agg)
    mod_stats = None
    if modulation is not None:
        with torch.no_grad():
            logp, ent, ebar = full_vocab_token_stats(logits, tokens)
        mod_stats = modulation_stats(
            extras["advantages"][:, None].expand(R, L), logp, extras["behaviour_logp"], ent, extras["response_mask"],
            modulation, ebar_exact=ebar,
        )
    signal = torch.full((R,), float("nan"), dtype=torch.float64)
    loss_fn = MinibatchLoss(
        policy=policy, r2vpo=r2vpo, lam=0.7, modulation=modulation, modulation_stats=mod_stats, ratio_mean=None,
        global_num_tokens=float(extras["response_mask"].sum()), global_num_seqs=float(R), signal=signal,
    )
    total = 0.0
    for rows in torch.split(torch.arange(R), split):
        logp, ent, ebar = full_vocab_token_stats(logits[rows], tokens[rows])
        loss, _ = loss_fn({"logp": logp, "entropy": ent, "ebar": ebar.detach()}, {k: v[rows] for k, v in extras.items()})
        total = total + loss
    total.backward()
    return total.detach(), logits.grad.clone(), signal, loss_fn


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"agg": "seq-mean-token-mean"},
        {"r2vpo": R2VPOConfig()},
        {"modulation": DynamoModulationConfig()},
        {"kl_coef": 0.05},
        {"r2vpo": R2VPOConfig(), "modulation": DynamoModulationConfig(), "kl_coef": 0.01},
    ],
)
def test_micro_batch_size_changes_nothing(kwargs):
    ref_loss, ref_grad, ref_signal, ref_fn = run(R, **kwargs)
    for split in (1, 2, 4):
        loss, grad, signal, fn = run(split, **kwargs)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(signal, ref_signal)
        assert fn.ratio_variance_sums() == pytest.approx(ref_fn.ratio_variance_sums())
    assert not torch.isnan(ref_signal).any()


def test_signal_is_surrogate_with_unweighted_advantages_in_original_row_order():
    _, _, signal, _ = run(2)
    logits, tokens, extras = make_rows()
    logp, _, _ = full_vocab_token_stats(logits, tokens)
    ratio = torch.exp(logp - extras["behaviour_logp"])
    a = extras["raw_advantages"][:, None]
    tok = torch.maximum(-a * ratio, -a * ratio.clamp(0.8, 1.28))
    tok = torch.where(a < 0, torch.minimum(tok, -a * 3.0), tok)
    m = extras["response_mask"].double()
    per_row = (tok * m).sum(1) / m.sum(1)
    expected = torch.empty(R, dtype=torch.float64)
    expected[extras["row_index"]] = per_row
    torch.testing.assert_close(signal, expected)


def test_missing_fields_are_named():
    fn = MinibatchLoss(
        policy=PolicyLossConfig(), r2vpo=None, lam=0.0, modulation=None, modulation_stats=None, ratio_mean=None,
        global_num_tokens=1.0, global_num_seqs=1.0, signal=None,
    )
    with pytest.raises(KeyError, match="advantages"):
        fn({"logp": torch.zeros(1, 1), "entropy": torch.zeros(1, 1)}, {"response_mask": torch.ones(1, 1)})
