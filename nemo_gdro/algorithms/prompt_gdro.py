"""Prompt-GDRO: the data adversary over difficulty bins (gdro.md §2).

A soft worst-group objective ``(1/eta) log sum_b exp(eta L_b)`` whose best
response is ``q_b ~ exp(eta L_b)``. Each step:

1. weights for this step come from the scores ``S_b`` up to the previous step;
2. after the actor update, the per-response loss signal of this step updates
   the scores of the bins present in the batch ("EMA-debiased exponential
   weights": bin mean divided by the bin's batch share, then an EMA).

``q`` acts on training either by scaling advantages (:meth:`PromptGDRO.response_weights`,
the paper's mode) or by choosing which prompts are drawn
(:meth:`PromptGDRO.sample_prompts`); the stages ``advantage_weighting=prompt_gdro``
and ``prompt_scheduler=prompt_gdro_resample`` select them.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from nemo_gdro.algorithms.bin_index import BinIndex
from nemo_gdro.algorithms.configs import PromptGDROConfig
from nemo_gdro.algorithms.losses import per_sequence_mean
from nemo_gdro.algorithms.segments import (
    check_segment_index,
    segment_count,
    segment_mean,
    segment_sum,
)


# --------------------------------------------------------------------------- signals
def surrogate_signal(
    token_loss: torch.Tensor,
    mask: torch.Tensor,
    kl: torch.Tensor | None = None,
    kl_coef: float = 0.0,
) -> torch.Tensor:
    """Paper signal: detached token mean of the clipped surrogate per response ``[R]``.

    ``token_loss [R, L]`` must be computed with UNWEIGHTED advantages. On an
    exactly on-policy mini-batch it equals ``-A`` per response, whose bin means
    vanish (GRPO advantages sum to zero within each group).
    """
    total = token_loss.detach()
    if kl is not None and kl_coef:
        total = total + kl_coef * kl.detach()
    return per_sequence_mean(total, mask).to(torch.float64)


def failure_signal(rewards: torch.Tensor, reward_range: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
    """``1 - rescaled reward`` per response ``[R]``; its bin mean is the bin's failure rate."""
    lo, hi = reward_range
    scaled = ((rewards.to(torch.float64) - lo) / (hi - lo)).clamp(0.0, 1.0)
    return 1.0 - scaled


def learnability_signal(
    rewards: torch.Tensor, group_index: torch.Tensor, num_groups: int, correct_threshold: float = 0.5
) -> torch.Tensor:
    """``p (1 - p)`` of each response's prompt this step (``p`` = its group's success rate) ``[R]``."""
    check_segment_index(group_index, num_groups)
    p = segment_mean((rewards > correct_threshold).to(torch.float64), group_index, num_groups)
    return (p * (1.0 - p))[group_index]


# ------------------------------------------------------------------------ controller
class PromptGDRO:
    """Bin scores ``S [B]`` and the distribution ``q`` they induce."""

    def __init__(self, config: PromptGDROConfig, num_bins: int, seed: int = 0) -> None:
        if num_bins < 1:
            raise ValueError(f"num_bins must be >= 1, got {num_bins}")
        self.config = config
        self.num_bins = int(num_bins)
        self.scores = torch.zeros(num_bins, dtype=torch.float64)
        self.observed = torch.zeros(num_bins, dtype=torch.bool)
        self.num_updates = 0
        self.rng = np.random.Generator(np.random.PCG64(seed))

    # -------------------------------------------------------------- distribution
    def omega(self) -> torch.Tensor:
        """Unnormalised weights ``exp(eta * clip(S, -C, C))`` ``[B]``."""
        s = self.scores
        if self.config.score_clip is not None:
            s = s.clamp(-self.config.score_clip, self.config.score_clip)
        return torch.exp(self.config.eta * s)

    def distribution(self, active: torch.Tensor) -> torch.Tensor:
        """``q [B]`` over the active bins (bool ``[B]``), zero elsewhere.

        ``q_b = (1 - gamma) omega_b / sum_active omega + gamma / |active|``.
        The max-shift keeps ``exp`` finite for large scores without changing q.
        """
        if not bool(active.any()):
            raise ValueError("Prompt-GDRO needs at least one active bin")
        s = self.scores
        if self.config.score_clip is not None:
            s = s.clamp(-self.config.score_clip, self.config.score_clip)
        logits = torch.where(active, self.config.eta * s, torch.full_like(s, -torch.inf))
        soft = torch.softmax(logits, dim=0)
        gamma = self.config.gamma
        q = (1.0 - gamma) * soft + gamma / float(active.sum())
        return torch.where(active, q, torch.zeros_like(q))

    def response_weights(
        self, response_bins: torch.Tensor, informative: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Advantage weights per response (``advantage_weight`` mode).

        Args:
            response_bins: int64 ``[R]`` bin of each response's prompt this step.
            informative: bool ``[R]`` the response's raw GRPO advantage is non-zero;
                needed by ``normalize_over: informative`` (the ``normalized`` form
                then rescales to mean 1 over these responses only; none
                informative: every weight is 1).
        Returns:
            ``(w [R] float64, w_bin [B])``: the weight applied to each response and
            per bin; a bin absent from the batch has no weight (NaN, never 0).
        """
        check_segment_index(response_bins, self.num_bins)
        counts = segment_count(response_bins, self.num_bins)
        active = counts > 0
        absent = torch.full_like(self.scores, torch.nan)
        if self.config.weight_form == "paper":
            w_bin = torch.where(active, self.omega().clamp(max=self.config.w_max), absent)
            return w_bin[response_bins], w_bin
        q = self.distribution(active)
        if self.config.normalize_over == "informative":
            if informative is None:
                raise ValueError("prompt_gdro.normalize_over=informative needs the informative mask [R] of the responses")
            if informative.shape != response_bins.shape:
                raise ValueError(f"informative {tuple(informative.shape)} and response_bins {tuple(response_bins.shape)} differ")
            counts = segment_count(response_bins[informative.to(torch.bool)], self.num_bins)
            if int(counts.sum()) == 0:  # nothing to learn from anywhere: leave the (zero) advantages alone
                w_bin = torch.where(active, torch.ones_like(q), absent)
                return w_bin[response_bins], w_bin
        # Rescale so the mean weight over the counted responses is 1, then cap.
        mean_q = float((q * counts.to(torch.float64)).sum()) / float(counts.sum())
        w_bin = torch.where(active, (q / mean_q).clamp(max=self.config.w_max), absent)
        return w_bin[response_bins], w_bin

    # ---------------------------------------------------------------------- update
    def observe(self, response_bins: torch.Tensor, signal: torch.Tensor) -> torch.Tensor:
        """Update bin scores from this step's per-response loss signal.

        Args:
            response_bins: int64 ``[R]``; signal: float ``[R]`` (detached).
        Returns:
            the debiased bin losses ``m~ [B]`` of this step (0 for absent bins).
        """
        check_segment_index(response_bins, self.num_bins)
        if signal.shape != response_bins.shape:
            raise ValueError(f"signal {tuple(signal.shape)} and response_bins {tuple(response_bins.shape)} differ")
        sig = signal.detach().to(torch.float64)
        counts = segment_count(response_bins, self.num_bins)
        present = counts > 0
        mean = segment_sum(sig, response_bins, self.num_bins) / counts.clamp_min(1).to(torch.float64)
        share = counts.to(torch.float64) / float(counts.sum())
        debiased = mean / share.clamp_min(self.config.share_floor)
        beta = self.config.beta
        ema = torch.where(self.observed, (1.0 - beta) * self.scores + beta * debiased, debiased)
        self.scores = torch.where(present, ema, self.scores)
        self.observed = self.observed | present
        self.num_updates += 1
        return torch.where(present, debiased, torch.zeros_like(debiased))

    # ------------------------------------------------------------------ resampling
    def resample_tilt(self, pool_share: torch.Tensor) -> torch.Tensor:
        """Relative draw weight of one prompt of each bin under ``resample_base: data`` ``[B]``.

        ``tilt_b = p_b / share_b = (1 - gamma) omega_b / sum_j share_j omega_j + gamma``
        over the bins holding pool prompts (0 elsewhere), so that
        ``p_b = share_b tilt_b`` (gdro.md §2) sums to 1. Equal scores give equal
        tilts (exactly: omega is shifted by its maximum first), i.e. uniform
        sampling over the pool.
        """
        nonempty = pool_share > 0
        if not bool(nonempty.any()):
            raise ValueError("Prompt-GDRO resampling needs a non-empty prompt pool")
        s = self.scores
        if self.config.score_clip is not None:
            s = s.clamp(-self.config.score_clip, self.config.score_clip)
        logits = self.config.eta * s
        top = logits[nonempty].max()
        omega = torch.where(nonempty, torch.exp(logits - top), torch.zeros_like(logits))
        gamma = self.config.gamma
        tilt = (1.0 - gamma) * omega / float((pool_share * omega).sum()) + gamma
        return torch.where(nonempty, tilt, torch.zeros_like(tilt))

    def sample_prompts(self, index: BinIndex, num_prompts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``resample`` mode: the step's prompts, by ``resample_base``.

        ``data``: bin b with probability ``p_b = share_b tilt_b`` (:meth:`resample_tilt`),
        prompts without replacement within the step
        (:meth:`BinIndex.sample_without_replacement`). ``bins``: a bin drawn from ``q``
        over the non-empty bins for every prompt, then a prompt in it, with replacement.

        Returns ``(prompt_ids [P], bins [P], p [B])``, ``p`` the bin distribution drawn from
        (``q`` for ``bins``).
        """
        if self.config.resample_base == "bins":
            active = index.counts() > 0
            q = self.distribution(active)
            bins = torch.from_numpy(self.rng.choice(self.num_bins, size=num_prompts, p=(q / q.sum()).numpy()))
            return index.sample_in_bins(bins, self.rng), bins.to(torch.int64), q
        counts = index.counts().to(torch.float64)
        share = counts / counts.sum()
        tilt = self.resample_tilt(share)
        ids, bins = index.sample_without_replacement((tilt / tilt.max()).numpy(), num_prompts, self.rng)
        return ids, bins, share * tilt

    def importance_weights(self, response_bins: torch.Tensor, q: torch.Tensor, index: BinIndex) -> torch.Tensor:
        """Advantage factors ``[R]`` float64 that make the resampled gradient unbiased for the
        average objective (``importance_correct``).

        ``data``: ``share_b / p_b`` (pool share over draw probability), capped at ``w_max``,
        then rescaled to mean 1 over the batch's responses (gdro.md §2). ``bins`` (the
        first form, unchanged): ``share_b / q_b`` capped at ``importance_cap``.
        """
        counts = index.counts().to(torch.float64)
        uniform = counts / counts.sum()
        if self.config.resample_base == "bins":
            ratio = torch.where(q > 0, uniform / q.clamp_min(1e-300), torch.zeros_like(q))
            return ratio.clamp(max=self.config.importance_cap)[response_bins]
        # A bin never drawn from has no correction to make (neutral 1, not 0: no silent zero gradient).
        ratio = torch.where(q > 0, uniform / q.clamp_min(1e-300), torch.ones_like(q)).clamp(max=self.config.w_max)
        w = ratio[response_bins]
        return w / w.mean() if w.numel() else w

    # -------------------------------------------------------------- checkpointing
    def state_dict(self) -> dict:
        return {
            "scores": self.scores.clone(),
            "observed": self.observed.clone(),
            "num_updates": self.num_updates,
            "rng": self.rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("scores", "observed", "num_updates", "rng"):
            if key not in state:
                raise KeyError(f"Prompt-GDRO checkpoint is missing {key!r}")
        if state["scores"].shape != (self.num_bins,):
            raise ValueError(
                f"Prompt-GDRO checkpoint has {state['scores'].numel()} bins, this run has {self.num_bins}"
            )
        self.scores = state["scores"].clone().to(torch.float64)
        self.observed = state["observed"].clone().to(torch.bool)
        self.num_updates = int(state["num_updates"])
        self.rng.bit_generator.state = state["rng"]

    def diagnostics(self, response_bins: torch.Tensor, weights_per_bin: torch.Tensor | None = None) -> dict[str, float]:
        """Per-bin score/omega/q/share and the data-vs-weight lead-lag gap (gdro.md §4).

        With ``weights_per_bin`` (the applied weight per bin, NaN for bins absent from
        the batch): ``weight/{b}`` (NaN when absent), ``weight_min`` / ``weight_max``
        over the bins present, and ``effective_bin_mass``: the total variation
        distance between the batch's response share per bin and the normalised
        share x weight (0 for flat weights; how much gradient mass the weights move).
        """
        counts = segment_count(response_bins, self.num_bins).to(torch.float64)
        share = counts / counts.sum().clamp_min(1.0)
        active = counts > 0
        q = self.distribution(active) if bool(active.any()) else torch.zeros_like(share)
        idx = torch.arange(self.num_bins, dtype=torch.float64)
        out = {
            "prompt_gdro/weight_entropy": float(-(q[q > 0] * q[q > 0].log()).sum()),
            "prompt_gdro/mean_bin_data": float((idx * share).sum()),
            "prompt_gdro/mean_bin_weight": float((idx * q).sum()),
        }
        out["prompt_gdro/lead_lag_gap"] = out["prompt_gdro/mean_bin_weight"] - out["prompt_gdro/mean_bin_data"]
        if weights_per_bin is not None:
            out.update(weight_summary(share, weights_per_bin))
        omega = self.omega()
        for b in range(self.num_bins):
            out[f"prompt_gdro/score/{b}"] = float(self.scores[b])
            out[f"prompt_gdro/omega/{b}"] = float(omega[b])
            out[f"prompt_gdro/q/{b}"] = float(q[b])
            out[f"prompt_gdro/response_share/{b}"] = float(share[b])
            if weights_per_bin is not None:
                # A bin absent from the batch has no weight: NaN (null in metrics.jsonl), never 0.
                out[f"prompt_gdro/weight/{b}"] = float(weights_per_bin[b]) if bool(active[b]) else math.nan
        return out


def weight_summary(share: torch.Tensor, weights_per_bin: torch.Tensor) -> dict[str, float]:
    """``weight_min``, ``weight_max`` over the bins present (``share > 0``) and the effective bin mass.

    Args:
        share: float ``[B]`` the batch's response share per bin.
        weights_per_bin: float ``[B]`` the applied weight per bin (absent bins: any value, ignored).
    Returns:
        NaN for all three when no bin is present. ``effective_bin_mass =
        0.5 sum_b |share_b - share_b w_b / sum_j share_j w_j|``.
    """
    present = share > 0
    if not bool(present.any()):
        return {f"prompt_gdro/{k}": math.nan for k in ("weight_min", "weight_max", "effective_bin_mass")}
    w = torch.where(present, weights_per_bin.to(torch.float64), torch.zeros_like(share))
    tilted = share * w
    total = float(tilted.sum())
    mass = 0.5 * float((share - tilted / total).abs().sum()) if total > 0 else math.nan
    return {
        "prompt_gdro/weight_min": float(w[present].min()),
        "prompt_gdro/weight_max": float(w[present].max()),
        "prompt_gdro/effective_bin_mass": mass,
    }
