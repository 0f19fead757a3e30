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
from nemo_gdro.parallel.rows import DataParallel
from nemo_gdro.stages.loss import ClippedLoss, R2VPOLoss
from nemo_gdro.stages.modulation import DynamoModulation, NoModulation
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
        "ref_logp": behaviour.detach() - 0.1,
    }
    # Rows arrive shuffled: micro-batch row j is original row ROW_INDEX[j].
    return logits, tokens, extras


ROW_INDEX = torch.tensor([4, 0, 5, 1, 3, 2])


def run(split, *, r2vpo=None, modulation=None, kl_coef=0.0, agg="token-mean"):
    logits, tokens, extras = make_rows()
    if agg == "informative-token-mean":
        for key in ("advantages", "raw_advantages"):
            extras[key][[1, 3]] = 0.0  # two rows of zero-variance groups
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
    loss_stage = R2VPOLoss(r2vpo, DataParallel()) if r2vpo is not None else ClippedLoss(policy)
    mod_stage = DynamoModulation(modulation, DataParallel()) if modulation is not None else NoModulation()
    loss_fn = MinibatchLoss(
        policy=policy, loss=loss_stage, loss_context={"lam": 0.7, "ratio_mean": None}, modulation=mod_stage,
        modulation_context=mod_stats, global_num_tokens=float(extras["response_mask"].sum()), global_num_seqs=float(R),
        global_num_informative_tokens=float((extras["response_mask"] & (extras["raw_advantages"] != 0)[:, None]).sum()),
    )
    total, sums = 0.0, {}
    for rows in torch.split(torch.arange(R), split):
        logp, ent, ebar = full_vocab_token_stats(logits[rows], tokens[rows])
        loss, metrics, row_out = loss_fn({"logp": logp, "entropy": ent, "ebar": ebar.detach()}, {k: v[rows] for k, v in extras.items()})
        signal[ROW_INDEX[rows]] = row_out["signal"]
        for key, value in metrics.items():
            sums[key] = sums.get(key, 0.0) + float(value)
        total = total + loss
    total.backward()
    return total.detach(), logits.grad.clone(), signal, sums


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"agg": "seq-mean-token-mean"},
        {"agg": "informative-token-mean", "kl_coef": 0.05},
        {"agg": "informative-token-mean", "r2vpo": R2VPOConfig()},
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
        assert fn.keys() == ref_fn.keys()
        for key in ref_fn:
            assert fn[key] == pytest.approx(ref_fn[key]), key
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
    expected[ROW_INDEX] = per_row
    torch.testing.assert_close(signal, expected)


def test_missing_fields_are_named():
    fn = MinibatchLoss(
        policy=PolicyLossConfig(), loss=ClippedLoss(PolicyLossConfig()), loss_context=None, modulation=NoModulation(),
        modulation_context=None, global_num_tokens=1.0, global_num_seqs=1.0,
    )
    with pytest.raises(KeyError, match="advantages"):
        fn({"logp": torch.zeros(1, 1), "entropy": torch.zeros(1, 1)}, {"response_mask": torch.ones(1, 1)})


def test_r2vpo_variance_is_reported_for_fresh_and_replayed_tokens():
    """r2vpo/V_fresh and V_replayed: the ratio variance over each kind of row, which V combines."""
    logits, tokens, extras = make_rows()
    replayed = torch.tensor([False, True, False, True, True, False])
    extras["replayed"] = replayed
    loss_fn = MinibatchLoss(
        policy=PolicyLossConfig(), loss=R2VPOLoss(R2VPOConfig(), DataParallel()), loss_context={"lam": 0.7, "ratio_mean": None},
        modulation=NoModulation(), modulation_context=None, global_num_tokens=float(extras["response_mask"].sum()),
        global_num_seqs=float(R),
    )
    logp, ent, ebar = full_vocab_token_stats(logits, tokens)
    _, sums, _ = loss_fn({"logp": logp, "entropy": ent, "ebar": ebar}, extras)
    report = {k: float(v) for k, v in sums.items()}
    report["loss"] = 0.0
    metrics = loss_fn.metrics(report)
    mask = extras["response_mask"]
    dev = (torch.exp(logp - extras["behaviour_logp"]) - 1.0) ** 2
    for kind, rows in (("fresh", ~replayed), ("replayed", replayed)):
        m = mask & rows[:, None]
        assert metrics[f"r2vpo/V_{kind}"] == pytest.approx(float((dev * m).sum() / m.sum()), rel=1e-10)
    n_f, n_r = report["fresh/tokens"], report["replayed/tokens"]
    v_all = report["r2vpo/sum_sq_dev"] / report["tokens"]
    assert v_all == pytest.approx((metrics["r2vpo/V_fresh"] * n_f + metrics["r2vpo/V_replayed"] * n_r) / (n_f + n_r))
    assert metrics["r2vpo/V_fresh"] != pytest.approx(metrics["r2vpo/V_replayed"])


def _report(loss_fn, logits, tokens, extras):
    logp, ent, ebar = full_vocab_token_stats(logits, tokens)
    _, sums, _ = loss_fn({"logp": logp, "entropy": ent, "ebar": ebar}, extras)
    report = {k: float(v) for k, v in sums.items()}
    report["loss"] = 0.0
    return logp, report


def test_informative_token_mean_divides_by_the_tokens_of_rows_with_an_advantage():
    """The numerator keeps the zero-advantage rows' KL; N counts the informative rows' tokens only;
    with every row informative it is token-mean; R2VPO's V takes the same N."""
    from nemo_gdro.algorithms.losses import k3_kl, r2vpo_token_loss

    logits, tokens, extras = make_rows()
    mask = extras["response_mask"]
    extras["advantages"][[1, 3]] = 0.0
    extras["raw_advantages"][[1, 3]] = 0.0
    informative = extras["raw_advantages"] != 0
    n, n_inf = float(mask.sum()), float((mask & informative[:, None]).sum())
    assert n_inf < n
    losses = {}
    for agg in ("token-mean", "informative-token-mean"):
        policy = PolicyLossConfig(kl_coef=0.05, loss_agg_mode=agg)
        stage = R2VPOLoss(R2VPOConfig(), DataParallel(), loss_agg_mode=agg)
        fn = MinibatchLoss(
            policy=policy, loss=stage, loss_context={"lam": 0.7, "ratio_mean": None}, modulation=NoModulation(),
            modulation_context=None, global_num_tokens=n, global_num_seqs=float(R), global_num_informative_tokens=n_inf,
        )
        logp, _, _ = full_vocab_token_stats(logits, tokens)
        loss, sums, _ = fn({"logp": logp, "entropy": torch.zeros_like(logp), "ebar": torch.zeros_like(logp)}, extras)
        losses[agg] = float(loss)
        report = {k: float(v) for k, v in sums.items()}
        assert report["informative_tokens"] == n_inf and report["tokens"] == n
        v = stage.after_update(report)["r2vpo/V"]
        assert v == pytest.approx(report["r2vpo/sum_sq_dev"] / (n_inf if agg == "informative-token-mean" else n))
    # By hand: (R2VPO terms + KL over every valid token) / N_inf.
    tl, _ = r2vpo_token_loss(logp.detach(), extras["behaviour_logp"], extras["advantages"], mask, 0.7)
    tl = tl + 0.05 * k3_kl(logp.detach(), extras["ref_logp"])
    numerator = float((tl * mask).sum())
    assert losses["informative-token-mean"] == pytest.approx(numerator / n_inf, rel=1e-10)
    assert losses["token-mean"] == pytest.approx(numerator / n, rel=1e-10)
    with pytest.raises(ValueError, match="informative-token-mean"):
        MinibatchLoss(policy=PolicyLossConfig(loss_agg_mode="informative-token-mean"), loss=ClippedLoss(PolicyLossConfig()),
                      loss_context=None, modulation=NoModulation(), modulation_context=None, global_num_tokens=n,
                      global_num_seqs=float(R))


def test_clipped_grad_share_and_the_clip_metrics_of_fresh_and_replayed_rows():
    """actor/clipped_grad_share = sum |A| over zero-gradient tokens / sum |A| over valid tokens, overall
    and per kind of row for the clipped loss; R2VPO reports 0 and the share clipping would remove."""
    from nemo_gdro.algorithms.losses import clip_regions

    logits, tokens, extras = make_rows()
    # Far from the behaviour policy, so that clipping fires.
    extras["behaviour_logp"] = extras["behaviour_logp"] + 0.6 * torch.randn(R, L, generator=torch.Generator().manual_seed(3),
                                                                            dtype=torch.float64)
    replayed = torch.tensor([False, True, False, True, True, False])
    extras["replayed"] = replayed
    mask = extras["response_mask"]
    n = float(mask.sum())
    common = dict(modulation=NoModulation(), modulation_context=None, global_num_tokens=n, global_num_seqs=float(R))
    policy = PolicyLossConfig()
    clipped_stage = ClippedLoss(policy)
    fn = MinibatchLoss(policy=policy, loss=clipped_stage, loss_context=None, **common)
    logp, report = _report(fn, logits, tokens, extras)
    ratio = torch.exp(logp.detach() - extras["behaviour_logp"])
    adv = extras["advantages"][:, None].expand(R, L)
    clip, dual = clip_regions(ratio, adv, eps_low=0.2, eps_high=0.28, dual_clip=3.0)
    zero_grad = (clip | dual) & mask

    def share(rows):
        m = mask & rows[:, None]
        return float((adv.abs() * (zero_grad & m)).sum() / (adv.abs() * m).sum())

    every = torch.ones(R, dtype=torch.bool)
    expected = share(every)
    assert 0.0 < expected < 1.0
    after = clipped_stage.after_update(report)
    metrics = fn.metrics(report)
    assert after["actor/clipped_grad_share"] == pytest.approx(expected, rel=1e-10)
    assert metrics["actor/would_clip_grad_share"] == pytest.approx(expected, rel=1e-10)
    assert metrics["actor/ratio_var"] == pytest.approx(float((((ratio - 1) ** 2) * mask).sum() / n), rel=1e-10)
    for kind, rows in (("fresh", ~replayed), ("replayed", replayed)):
        m = mask & rows[:, None]
        assert metrics[f"actor/clipped_grad_share_{kind}"] == pytest.approx(share(rows), rel=1e-10)
        assert metrics[f"actor/clip_frac_{kind}"] == pytest.approx(int((clip & m).sum()) / int(m.sum()), rel=1e-10)
        assert metrics[f"actor/ratio_var_{kind}"] == pytest.approx(float((((ratio - 1) ** 2) * m).sum() / m.sum()))
    assert metrics["actor/clipped_grad_share_fresh"] != pytest.approx(metrics["actor/clipped_grad_share_replayed"])

    r2vpo_stage = R2VPOLoss(R2VPOConfig(lam_init=0.5), DataParallel())
    fn = MinibatchLoss(policy=policy, loss=r2vpo_stage, loss_context={"lam": 0.5, "ratio_mean": None}, **common)
    _, report = _report(fn, logits, tokens, extras)
    after = r2vpo_stage.after_update(report)
    assert after["actor/clipped_grad_share"] == 0.0 and after["r2vpo/lambda_positive"] == 1.0
    assert fn.metrics(report)["actor/would_clip_grad_share"] == pytest.approx(expected, rel=1e-10)
    assert "actor/clip_frac_fresh" not in fn.metrics(report)
    # lambda_positive follows lambda: a dual step that takes it to 0 reports 0.
    r2vpo_stage.dual.load_state_dict({"lam": 0.0, "num_updates": 1, "last_v_hat": 0.0})
    report["r2vpo/sum_sq_dev"] = 0.0  # V = 0 < delta: lambda stays at its floor 0
    assert r2vpo_stage.after_update(report)["r2vpo/lambda_positive"] == 0.0
