"""The RL loss of one optimizer step, evaluated micro-batch by micro-batch.

``MinibatchLoss`` is what the actor calls for each micro-batch: it turns the
current policy's token statistics (``logp`` with gradient, ``entropy``,
``ebar``) and the micro-batch's rows (behaviour log-probs, advantages, masks)
into the configured loss:

- advantages scaled per response (Prompt-GDRO weights, resampling importance
  weights; computed by the loop) and per token (DynaMO modulation);
- the clipped policy loss or the R²VPO loss, plus the optional k3 KL;
- aggregated over the GLOBAL token (or sequence) count of the mini-batch, so
  summing over micro-batches gives the full mini-batch loss whatever the
  micro-batch size (grpo_base.md §5).

As side outputs, it writes the per-response loss signal of the controllers
(detached token mean of the clipped surrogate with UNWEIGHTED advantages,
gdro.md §2) into ``signal[row_index]`` (original row order, whatever the
shuffling), and accumulates R²VPO's ratio-variance sums for the dual update.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from nemo_gdro.algorithms.dynamo_modulation import (
    DynamoModulationConfig,
    ModulationStats,
    modulate_advantages,
)
from nemo_gdro.algorithms.losses import (
    PolicyLossConfig,
    R2VPOConfig,
    aggregate_token_loss,
    clipped_policy_loss,
    k3_kl,
    r2vpo_token_loss,
)
from nemo_gdro.algorithms.prompt_gdro import surrogate_signal

# Per-row tensors the loop passes with every micro-batch (row slices of the mini-batch).
REQUIRED_EXTRAS = ("response_mask", "behaviour_logp", "advantages", "raw_advantages", "row_index")


@dataclass
class StepAccumulator:
    """Detached sums over the micro-batches of one optimizer step."""

    loss: float = 0.0
    tokens: float = 0.0
    sum_sq_dev: float = 0.0
    ratio_sum: float = 0.0
    kept_tokens: float = 0.0
    clip_tokens: float = 0.0
    dual_clip_tokens: float = 0.0
    entropy_sum: float = 0.0
    kl_sum: float = 0.0
    max_ratio_fired: float = 0.0
    modulation: dict[str, float] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        n = max(self.tokens, 1.0)
        out = {
            "actor/loss": self.loss,
            "actor/clip_frac": self.clip_tokens / n,
            "actor/dual_clip_frac": self.dual_clip_tokens / n,
            "actor/entropy": self.entropy_sum / n,
            "actor/kl": self.kl_sum / n,
            "actor/tokens": self.tokens,
        }
        out.update({f"dynamo/{k}": v / n for k, v in self.modulation.items()})
        return out


class MinibatchLoss:
    """Callable ``(stats, extras) -> (loss, metrics)`` for one optimizer step's micro-batches."""

    def __init__(
        self,
        *,
        policy: PolicyLossConfig,
        r2vpo: R2VPOConfig | None,
        lam: float,
        modulation: DynamoModulationConfig | None,
        modulation_stats: ModulationStats | None,
        ratio_mean: float | None,
        global_num_tokens: float,
        global_num_seqs: float,
        signal: torch.Tensor | None,
        signal_include_kl: bool = False,
    ) -> None:
        self.policy = policy
        self.r2vpo = r2vpo
        self.lam = float(lam)
        self.modulation = modulation
        self.modulation_stats = modulation_stats
        self.ratio_mean = ratio_mean
        self.global_num_tokens = float(global_num_tokens)
        self.global_num_seqs = float(global_num_seqs)
        self.signal = signal
        self.signal_include_kl = signal_include_kl
        self.acc = StepAccumulator()

    def __call__(self, stats: dict[str, torch.Tensor], extras: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        missing = [k for k in REQUIRED_EXTRAS if k not in extras]
        if missing:
            raise KeyError(f"micro-batch is missing per-row fields {missing}")
        logp = stats["logp"]
        mask = extras["response_mask"]
        logp_old = extras["behaviour_logp"].to(logp.dtype)
        adv = extras["advantages"].to(logp.dtype)[:, None].expand_as(logp)
        raw_adv = extras["raw_advantages"].to(logp.dtype)[:, None].expand_as(logp)
        entropy = stats["entropy"].detach()

        if self.modulation is not None:
            adv, mod_metrics = modulate_advantages(
                adv,
                logp.detach(),
                logp_old,
                entropy,
                mask,
                self.modulation,
                ebar_exact=stats.get("ebar"),
                stats=self.modulation_stats if self.modulation.scope == "minibatch" else None,
            )
            valid = float(mask.sum())
            for key in ("beta_comp/mean", "beta_stab/mean", "frac_beta_stab_below_0.95"):
                if key in mod_metrics:
                    self.acc.modulation[key] = self.acc.modulation.get(key, 0.0) + float(mod_metrics[key]) * valid

        if self.r2vpo is None:
            token_loss, clip_metrics = clipped_policy_loss(
                logp, logp_old, adv, mask,
                eps_low=self.policy.eps_low, eps_high=self.policy.eps_high, dual_clip=self.policy.dual_clip,
            )
            valid = float(mask.sum())
            self.acc.clip_tokens += float(clip_metrics["clip_frac"]) * valid
            self.acc.dual_clip_tokens += float(clip_metrics["dual_clip_frac"]) * valid
        else:
            token_loss, r_stats = r2vpo_token_loss(
                logp, logp_old, adv, mask, self.lam,
                center=self.r2vpo.center, ratio_mean=self.ratio_mean, max_ratio=self.r2vpo.max_ratio,
            )
            self.acc.sum_sq_dev += float(r_stats["sum_sq_dev"])
            self.acc.ratio_sum += float(r_stats["ratio_sum"])
            self.acc.kept_tokens += float(r_stats["num_kept"])
            self.acc.max_ratio_fired += float(r_stats["max_ratio_fired"]) * float(mask.sum())

        kl = None
        if self.policy.kl_coef > 0:
            if "ref_logp" not in extras:
                raise KeyError("algorithm.policy_loss.kl_coef > 0 but the micro-batch has no ref_logp")
            kl = k3_kl(logp, extras["ref_logp"].to(logp.dtype))
            token_loss = token_loss + self.policy.kl_coef * torch.where(mask.bool(), kl, torch.zeros_like(kl))
            self.acc.kl_sum += float((kl.detach() * mask).sum())

        loss = aggregate_token_loss(
            token_loss, mask, self.policy.loss_agg_mode,
            global_num_tokens=self.global_num_tokens, global_num_seqs=self.global_num_seqs,
            norm_constant=self.policy.norm_constant,
        )

        if self.signal is not None:
            # The controllers' signal uses the paper's clipped surrogate with the
            # UNWEIGHTED advantages, whatever loss trains the policy.
            with torch.no_grad():
                surrogate, _ = clipped_policy_loss(
                    logp.detach(), logp_old, raw_adv, mask,
                    eps_low=self.policy.eps_low, eps_high=self.policy.eps_high, dual_clip=self.policy.dual_clip,
                )
                kl_term = kl.detach() if (kl is not None and self.signal_include_kl) else None
                per_row = surrogate_signal(surrogate, mask, kl_term, self.policy.kl_coef)
                self.signal[extras["row_index"].long()] = per_row.to(self.signal.dtype)

        self.acc.loss += float(loss.detach())
        self.acc.tokens += float(mask.sum())
        self.acc.entropy_sum += float((entropy * mask).sum())
        return loss, {}

    def ratio_variance_sums(self) -> tuple[float, float]:
        """``(sum (r - c)^2, token count)`` of this step, for R²VPO's dual update."""
        return self.acc.sum_sq_dev, self.acc.tokens
