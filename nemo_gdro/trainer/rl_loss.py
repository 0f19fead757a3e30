"""The RL loss of one optimizer step, evaluated micro-batch by micro-batch.

``MinibatchLoss`` is what the actor calls for each micro-batch: it turns the
current policy's token statistics (``logp`` with gradient, ``entropy``,
``ebar``) and the micro-batch's rows (behaviour log-probs, advantages, masks)
into the configured loss:

- advantages scaled per response (Prompt-GDRO weights, resampling importance
  weights; computed by the step) and per token (the token-modulation stage);
- the policy-loss stage's token loss (clipped or R²VPO), plus the optional
  k3 KL to the reference policy;
- aggregated over the GLOBAL token (or sequence, or informative-token) count
  of the mini-batch, so summing over micro-batches gives the full mini-batch
  loss whatever the micro-batch size (grpo_base.md §5).

Besides the loss stage's own sums it reports, for every loss, the ratio
statistics that make losses and staleness levels comparable: ``actor/ratio_var``
(mean ``(r - 1)^2`` over valid tokens) and ``actor/would_clip_grad_share`` (the
|A~|-weighted share of the tokens the clipped loss, at ``policy_loss``'s
``eps_low`` / ``eps_high`` / ``dual_clip``, would give zero gradient: for the
clipped loss the share it does remove), and with replay the same per kind of row
(``..._fresh`` / ``..._replayed``).

It returns, through the actor's one reduce-and-broadcast channel, the loss,
token-weighted metric sums (summed over micro-batches and DP ranks by the
actor) and one per-row output, ``signal``: the controllers' per-response
loss signal (detached token mean of the clipped surrogate with UNWEIGHTED
advantages, gdro.md §2), whatever loss trains the policy.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from nemo_gdro.algorithms.losses import (
    PolicyLossConfig,
    abs_advantage_share,
    aggregate_token_loss,
    clip_regions,
    clipped_policy_loss,
    informative_token_count,
    k3_kl,
    policy_ratio,
)
from nemo_gdro.algorithms.mismatch import mismatch_row_sums
from nemo_gdro.algorithms.prompt_gdro import surrogate_signal
from nemo_gdro.stages.base import PolicyLoss, TokenModulation

# Per-row tensors the step passes with every micro-batch (row slices of the mini-batch).
REQUIRED_EXTRAS = ("response_mask", "behaviour_logp", "advantages", "raw_advantages")


class MinibatchLoss:
    """Callable ``(stats, extras) -> (loss, metric sums, {"signal": [b]})`` for one optimizer step.

    Args:
        policy: clip range, dual clip, KL coefficient and aggregation (``algorithm.policy_loss``).
        loss: the policy-loss stage and ``loss_context`` its :meth:`~PolicyLoss.prepare` result.
        modulation: the token-modulation stage and ``modulation_context`` likewise.
        global_num_tokens / global_num_seqs: the mini-batch's counts over all DP ranks.
        global_num_informative_tokens: the mini-batch's valid tokens of rows with a non-zero raw
            advantage, over all DP ranks (the divisor of ``informative-token-mean``; required by it).
        signal_include_kl: add ``kl_coef * KL`` to the controllers' surrogate signal.
        behaviour_from_forward: the behaviour log-probs are this forward's own ``logp`` (detached;
            :mod:`nemo_gdro.trainer.behaviour`), so ``extras`` carry no ``behaviour_logp``; with
            ``engine_logp`` / ``engine_mask`` in ``extras`` the engine-vs-actor mismatch sums are
            returned as row outputs (``MISMATCH_ROWS``).
    """

    def __init__(
        self,
        *,
        policy: PolicyLossConfig,
        loss: PolicyLoss,
        loss_context: Any,
        modulation: TokenModulation,
        modulation_context: Any,
        global_num_tokens: float,
        global_num_seqs: float,
        global_num_informative_tokens: float | None = None,
        signal_include_kl: bool = False,
        behaviour_from_forward: bool = False,
    ) -> None:
        if policy.loss_agg_mode == "informative-token-mean" and global_num_informative_tokens is None:
            raise ValueError("algorithm.policy_loss.loss_agg_mode=informative-token-mean needs the mini-batch's "
                             "global informative token count (global_num_informative_tokens)")
        self.policy = policy
        self.loss = loss
        self.loss_context = loss_context
        self.modulation = modulation
        self.modulation_context = modulation_context
        self.global_num_tokens = float(global_num_tokens)
        self.global_num_seqs = float(global_num_seqs)
        self.global_num_informative_tokens = (
            None if global_num_informative_tokens is None else float(global_num_informative_tokens)
        )
        self.signal_include_kl = signal_include_kl
        self.behaviour_from_forward = behaviour_from_forward
        self.required = tuple(k for k in REQUIRED_EXTRAS if not (behaviour_from_forward and k == "behaviour_logp"))

    def __call__(
        self, stats: Mapping[str, torch.Tensor], extras: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        missing = [k for k in self.required if k not in extras]
        if missing:
            raise KeyError(f"micro-batch is missing per-row fields {missing}")
        logp = stats["logp"]
        mask = extras["response_mask"]
        # On-policy with unchanged weights the behaviour log-probs are this forward's: ratio 1, same gradient.
        logp_old = logp.detach() if self.behaviour_from_forward else extras["behaviour_logp"].to(logp.dtype)
        adv = extras["advantages"].to(logp.dtype)[:, None].expand_as(logp)
        raw_adv = extras["raw_advantages"].to(logp.dtype)[:, None].expand_as(logp)
        # Rows of zero-variance groups (raw GRPO advantage 0) carry no policy gradient.
        informative = extras["raw_advantages"] != 0
        entropy = stats["entropy"].detach()
        valid = float(mask.sum())

        adv, sums = self.modulation.modulate(adv, stats, logp_old, mask, self.modulation_context)
        token_loss, loss_sums = self.loss.token_loss(logp, logp_old, adv, mask, self.loss_context)
        sums.update(loss_sums)
        sums.update(self._ratio_sums(logp, logp_old, adv, mask))
        if "replayed" in extras:
            sums.update(self._sums_by_kind(logp, logp_old, adv, mask, extras["replayed"]))
        if "token_weights" in extras:  # truncated importance sampling (rollout.tis_cap)
            token_loss = token_loss * extras["token_weights"].to(token_loss.dtype)

        kl = None
        if self.policy.kl_coef > 0:
            if "ref_logp" not in extras:
                raise KeyError("algorithm.policy_loss.kl_coef > 0 but the micro-batch has no ref_logp")
            kl = k3_kl(logp, extras["ref_logp"].to(logp.dtype))
            token_loss = token_loss + self.policy.kl_coef * torch.where(mask.bool(), kl, torch.zeros_like(kl))
            sums["kl_sum"] = (kl.detach() * mask).sum().double()

        loss = aggregate_token_loss(
            token_loss, mask, self.policy.loss_agg_mode,
            global_num_tokens=self.global_num_tokens, global_num_seqs=self.global_num_seqs,
            norm_constant=self.policy.norm_constant, informative=informative,
            global_num_informative_tokens=self.global_num_informative_tokens,
        )
        with torch.no_grad():
            # The controllers' signal uses the paper's clipped surrogate with the
            # UNWEIGHTED advantages, whatever loss trains the policy.
            surrogate, _ = clipped_policy_loss(
                logp.detach(), logp_old, raw_adv, mask,
                eps_low=self.policy.eps_low, eps_high=self.policy.eps_high, dual_clip=self.policy.dual_clip,
            )
            kl_term = kl.detach() if (kl is not None and self.signal_include_kl) else None
            signal = surrogate_signal(surrogate, mask, kl_term, self.policy.kl_coef)
        sums["tokens"] = torch.tensor(valid, dtype=torch.float64)
        sums["informative_tokens"] = informative_token_count(mask, informative).double()
        sums["entropy_sum"] = (entropy * mask).sum().double()
        rows = {"signal": signal}
        if self.behaviour_from_forward and "engine_logp" in extras:
            rows.update(mismatch_row_sums(logp, extras["engine_logp"].to(logp.dtype), extras["engine_mask"].bool()))
        return loss, sums, rows

    @torch.no_grad()
    def _ratio_sums(
        self, logp: torch.Tensor, logp_old: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Loss-independent sums: ``(r - 1)^2`` over valid tokens and the |A~| where the clipped loss
        (``policy_loss``'s clip range) would give zero gradient, with the |A~| of all valid tokens."""
        valid = mask.bool()
        ratio = policy_ratio(logp.detach(), logp_old.detach())
        p = self.policy
        clip_fired, dual_fired = clip_regions(ratio, adv.detach(), eps_low=p.eps_low, eps_high=p.eps_high,
                                              dual_clip=p.dual_clip)
        would, total = abs_advantage_share(adv, clip_fired | dual_fired, valid)
        sq_dev = torch.where(valid, (ratio.double() - 1.0) ** 2, torch.zeros_like(ratio, dtype=torch.float64))
        return {"ratio/sq_dev_sum": sq_dev.sum(), "ratio/would_clip_abs_adv": would, "ratio/abs_adv": total}

    @torch.no_grad()
    def _sums_by_kind(
        self, logp: torch.Tensor, logp_old: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor, replayed: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The loss stage's sums and the ratio sums over fresh and over replayed rows separately
        (``fresh/...``, ``replayed/...``)."""
        out: dict[str, torch.Tensor] = {}
        for kind, rows in (("fresh", ~replayed.bool()), ("replayed", replayed.bool())):
            kind_mask = mask & rows[:, None]
            _, kind_sums = self.loss.token_loss(logp.detach(), logp_old, adv, kind_mask, self.loss_context)
            kind_sums.update(self._ratio_sums(logp, logp_old, adv, kind_mask))
            out.update({f"{kind}/{k}": v for k, v in kind_sums.items()})
            out[f"{kind}/tokens"] = kind_mask.sum().double()
        return out

    def metrics(self, report: Mapping[str, float]) -> dict[str, float]:
        """Mini-batch metrics from the actor's summed report (the loss stage's own first).

        Per kind of row (replay on): ``r2vpo/V_{kind}`` (R²VPO; mean ``(r-1)^2`` over that kind's
        valid tokens), ``actor/clip_frac_{kind}`` and ``actor/clipped_grad_share_{kind}`` (clipped
        loss), ``actor/ratio_var_{kind}`` and ``actor/would_clip_grad_share_{kind}`` (every loss).
        """
        n = max(report["tokens"], 1.0)
        out = {
            "actor/loss": report["loss"],
            "actor/entropy": report["entropy_sum"] / n,
            "actor/kl": report.get("kl_sum", 0.0) / n,
            "actor/tokens": report["tokens"],
            # Tokens of rows with a non-zero raw advantage (the divisor of informative-token-mean), as a share.
            "actor/informative_token_share": report["informative_tokens"] / n,
            "actor/ratio_var": report["ratio/sq_dev_sum"] / n,
            "actor/would_clip_grad_share": _share(report, "ratio/would_clip_abs_adv", "ratio/abs_adv"),
        }
        out.update(self.modulation.metrics(report, report["tokens"]))
        for kind in ("fresh", "replayed"):
            tokens = report.get(f"{kind}/tokens", 0.0)
            if tokens <= 0:
                continue
            if f"{kind}/r2vpo/sum_sq_dev" in report:  # R2VPO's V over fresh and over replayed tokens (r2vpo.md §3)
                out[f"r2vpo/V_{kind}"] = report[f"{kind}/r2vpo/sum_sq_dev"] / tokens
            if f"{kind}/clip_tokens" in report:  # the clipped loss: what clipping did to each kind
                out[f"actor/clip_frac_{kind}"] = report[f"{kind}/clip_tokens"] / tokens
                out[f"actor/clipped_grad_share_{kind}"] = _share(report, f"{kind}/clipped_abs_adv", f"{kind}/abs_adv")
            out[f"actor/ratio_var_{kind}"] = report[f"{kind}/ratio/sq_dev_sum"] / tokens
            out[f"actor/would_clip_grad_share_{kind}"] = _share(
                report, f"{kind}/ratio/would_clip_abs_adv", f"{kind}/ratio/abs_adv"
            )
        return out


def _share(report: Mapping[str, float], part: str, total: str) -> float:
    """``report[part] / report[total]``, 0 when the total is 0 (no token carries an advantage)."""
    return report[part] / report[total] if report[total] > 0 else 0.0
