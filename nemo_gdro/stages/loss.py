"""Policy losses: the clipped surrogate (GRPO/DAPO, grpo_base.md §4) or R²VPO (r2vpo.md §1-2).

Each reports, per optimizer step, ``actor/clipped_grad_share``: the |A~|-weighted share of the
valid tokens whose gradient clipping removes (``sum_{clipped} |A~_t| / sum_{valid} |A~_t|``, A~
the advantage the loss sees, after stage weights and token modulation; the ordinary and the
dual clip both count). R²VPO never clips: 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from nemo_gdro.algorithms.losses import (
    DualVariableController,
    PolicyLossConfig,
    R2VPOConfig,
    abs_advantage_share,
    clipped_policy_loss,
    policy_ratio,
    r2vpo_token_loss,
)
from nemo_gdro.parallel.rows import DataParallel
from nemo_gdro.stages.base import MinibatchView
from nemo_gdro.stages.context import StageContext


class ClippedLoss:
    """``max(-A r, -A clip(r, 1-eps_low, 1+eps_high))`` with dual clip for ``A < 0``."""

    needs_current_policy = False

    def __init__(self, config: PolicyLossConfig) -> None:
        self.config = config

    @classmethod
    def from_context(cls, ctx: StageContext) -> ClippedLoss:
        return cls(ctx.setup.policy_loss)

    def prepare(self, view: MinibatchView) -> Any:
        return None

    def token_loss(
        self, logp: torch.Tensor, behaviour_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
        context: Any,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        c = self.config
        token_loss, m = clipped_policy_loss(
            logp, behaviour_logp, advantages, mask, eps_low=c.eps_low, eps_high=c.eps_high, dual_clip=c.dual_clip
        )
        valid = float(mask.sum())
        clipped_abs, total_abs = abs_advantage_share(advantages.detach(), m["zero_grad_mask"], mask)
        return token_loss, {
            "clip_tokens": m["clip_frac"].double() * valid,
            "dual_clip_tokens": m["dual_clip_frac"].double() * valid,
            "clipped_abs_adv": clipped_abs,
            "abs_adv": total_abs,
        }

    def after_update(self, sums: Mapping[str, float]) -> dict[str, float]:
        n = max(sums["tokens"], 1.0)
        return {
            "actor/clip_frac": sums["clip_tokens"] / n,
            "actor/dual_clip_frac": sums["dual_clip_tokens"] / n,
            "actor/clipped_grad_share": clipped_grad_share(sums),
        }

    def stateful(self) -> dict[str, object]:
        return {}


def clipped_grad_share(sums: Mapping[str, float], prefix: str = "") -> float:
    """``clipped_abs_adv / abs_adv`` of a loss's summed report (0 when no token has an advantage)."""
    total = sums[f"{prefix}abs_adv"]
    return sums[f"{prefix}clipped_abs_adv"] / total if total > 0 else 0.0


class R2VPOLoss:
    """``-r A + lam (r - c)^2`` per token, no clipping; ``lam`` follows the dual update after each optimizer step.

    ``loss_agg_mode`` (``algorithm.policy_loss``): V is normalised by the same N as the loss
    (r2vpo.md §4): the valid tokens, or with ``informative-token-mean`` the valid tokens of
    informative rows (``informative_tokens`` in the step's sums).
    """

    def __init__(self, config: R2VPOConfig, dp: DataParallel, loss_agg_mode: str = "token-mean") -> None:
        self.config = config
        self.dp = dp
        self.dual = DualVariableController(config)
        self.needs_current_policy = config.center == "batch_mean"
        self.v_count = "informative_tokens" if loss_agg_mode == "informative-token-mean" else "tokens"

    @classmethod
    def from_context(cls, ctx: StageContext) -> R2VPOLoss:
        return cls(ctx.setup.r2vpo, ctx.dp, ctx.setup.policy_loss.loss_agg_mode)

    def prepare(self, view: MinibatchView) -> dict[str, float]:
        """The multiplier for this optimizer step and, for ``center=batch_mean``, the global mean ratio."""
        context: dict[str, float] = {"lam": self.dual.lam, "ratio_mean": None}
        if self.needs_current_policy:
            now = view.current
            assert now is not None, "R2VPOLoss(center=batch_mean) needs the current policy's token statistics"
            ratio = policy_ratio(now["logp"], view.behaviour_logp)
            total, count = self.dp.total(float((ratio * view.mask).sum()), float(view.mask.sum()))
            context["ratio_mean"] = total / max(count, 1.0)
        return context

    def token_loss(
        self, logp: torch.Tensor, behaviour_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
        context: dict[str, float],
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        c = self.config
        token_loss, s = r2vpo_token_loss(
            logp, behaviour_logp, advantages, mask, context["lam"],
            center=c.center, ratio_mean=context["ratio_mean"], max_ratio=c.max_ratio,
        )
        return token_loss, {
            "r2vpo/sum_sq_dev": s["sum_sq_dev"].double(),
            "r2vpo/ratio_sum": s["ratio_sum"].double(),
            "r2vpo/kept_tokens": s["num_kept"].double(),
            "r2vpo/max_ratio_fired_tokens": s["max_ratio_fired"].double() * float(mask.sum()),
        }

    def after_update(self, sums: Mapping[str, float]) -> dict[str, float]:
        """Dual step on the global ratio variance ``V_hat`` of the optimizer step just taken.

        ``r2vpo/lambda_positive``: 1.0 when lambda > 0 after this dual step (the brake acts), else 0.0;
        the step reports the value after its last optimizer step.
        """
        v_hat = sums["r2vpo/sum_sq_dev"] / max(sums[self.v_count], 1.0)
        self.dual.update(v_hat)
        return {
            "r2vpo/V": v_hat,
            "r2vpo/lambda": self.dual.lam,
            "r2vpo/lambda_positive": 1.0 if self.dual.lam > 0 else 0.0,
            "actor/clipped_grad_share": 0.0,  # no clipping
        }

    def stateful(self) -> dict[str, object]:
        return {"dual": self.dual}
