"""Token-level policy losses: GRPO/DAPO clipped loss, k3 KL, layout-invariant
aggregation, and R²VPO (ratio-variance regularised policy optimisation).

Specs: ``shared/spec/grpo_base.md`` §4-§5 and ``shared/spec/r2vpo.md``.

Shapes follow ``CONVENTIONS.md``: token tensors are padded ``[R, L]`` with a
``mask [R, L]`` (bool or 0/1 float) marking valid response tokens; per-response
tensors are ``[R]``. Log-probabilities are natural-log nats per token.

Everything here is pure torch and layout-agnostic: global counts (tokens,
sequences) and the ratio-variance statistics are either passed in already
reduced or reduced over an explicit process group.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from nemo_gdro.algorithms._validation import bool_mask, is_real, token_advantages
from nemo_gdro.algorithms.configs import LOSS_AGG_MODES, R2VPO_CENTERS, PolicyLossConfig, R2VPOConfig
from nemo_gdro.parallel import comm

__all__ = [
    "LOSS_AGG_MODES",
    "LOG_RATIO_CLAMP",
    "policy_ratio",
    "clipped_policy_loss",
    "clip_regions",
    "abs_advantage_share",
    "k3_kl",
    "per_sequence_mean",
    "informative_token_count",
    "aggregate_token_loss",
    "PolicyLossConfig",
    "r2vpo_token_loss",
    "ratio_variance",
    "R2VPOConfig",
    "DualVariableController",
]

# exp(20) ~ 4.9e8: large enough never to bind for a sane update, small enough
# that the ratio (and its square in R²VPO) stays finite in float32.
LOG_RATIO_CLAMP = 20.0


Number = int | float
Scalar = Number | torch.Tensor


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #
def _check_same_shape(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_a} and {name_b} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def _check_token_tensor(name: str, t: torch.Tensor) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} must be a [R, L] token tensor, got shape {tuple(t.shape)}")


def _count_divisor(count: Scalar, like: torch.Tensor) -> torch.Tensor:
    # A step (or rank) with no valid tokens has a zero numerator; dividing by
    # max(count, 1) returns 0 instead of NaN without changing any real count.
    c = torch.as_tensor(count, dtype=like.dtype, device=like.device).detach()
    return c.clamp_min(1.0)


# --------------------------------------------------------------------------- #
# GRPO / DAPO baseline (grpo_base.md §4)
# --------------------------------------------------------------------------- #
def policy_ratio(logp: torch.Tensor, logp_old: torch.Tensor) -> torch.Tensor:
    """Importance ratio ``exp(clamp(logp - logp_old, -20, 20))``, shape ``[R, L]``.

    Differentiable w.r.t. ``logp`` (and ``logp_old`` if it requires grad;
    callers normally pass it detached).
    """
    _check_same_shape("logp", logp, "logp_old", logp_old)
    return torch.exp(torch.clamp(logp - logp_old, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))


def clipped_policy_loss(
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    dual_clip: float | None = 3.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO/DAPO clipped surrogate with dual clip, per token (to be minimised).

    Args:
        logp, logp_old: ``[R, L]`` per-token log-probs of the current and the
            rollout (old) policy.
        advantages: ``[R]`` (broadcast over tokens) or ``[R, L]``.
        mask: ``[R, L]`` valid-token mask (bool or 0/1 float).
        eps_low, eps_high: asymmetric clip range ``[1 - eps_low, 1 + eps_high]``.
        dual_clip: constant ``c > 1`` bounding the loss of negative-advantage
            tokens by ``-A * c``; ``None`` disables it.

    Returns:
        ``token_loss [R, L]`` (0 at masked positions) and detached metrics
        over valid tokens: 0-d ``clip_frac`` (tokens whose clipped branch is
        active, i.e. zero gradient), ``dual_clip_frac`` (A < 0 tokens bounded
        by the dual clip, zero gradient too), ``ratio_mean``, and
        ``zero_grad_mask`` (bool ``[R, L]``: valid tokens where either clip
        removes the gradient, see :func:`clip_regions`).
    """
    _check_token_tensor("logp", logp)
    _check_same_shape("logp", logp, "mask", mask)
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"dual_clip must be > 1 or None, got {dual_clip}")
    valid = bool_mask(mask)
    adv = token_advantages(advantages, logp)

    ratio = policy_ratio(logp, logp_old)
    loss_unclipped = -adv * ratio
    loss_clipped = -adv * torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    loss = torch.maximum(loss_unclipped, loss_clipped)

    if dual_clip is not None:
        negative = adv < 0
        loss_dual = torch.minimum(loss, -adv * dual_clip)
        loss = torch.where(negative, loss_dual, loss)
    token_loss = torch.where(valid, loss, torch.zeros_like(loss))

    with torch.no_grad():
        clip_fired, dual_fired = clip_regions(
            ratio.detach(), adv.detach(), eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip
        )
        n = _count_divisor(valid.sum(), logp)
        metrics = {
            "clip_frac": (clip_fired & valid).sum().to(logp.dtype) / n,
            "dual_clip_frac": (dual_fired & valid).sum().to(logp.dtype) / n,
            "ratio_mean": torch.where(valid, ratio, torch.zeros_like(ratio)).sum() / n,
            "zero_grad_mask": (clip_fired | dual_fired) & valid,
        }
    return token_loss, {k: v.detach() for k, v in metrics.items()}


def clip_regions(
    ratio: torch.Tensor,
    advantages: torch.Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    dual_clip: float | None = 3.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the clipped surrogate's gradient is zero, bool ``([R, L], [R, L])``.

    ``ratio`` and ``advantages`` (``[R]`` or ``[R, L]``) as in
    :func:`clipped_policy_loss`; no mask is applied. The first tensor marks
    tokens whose clipped branch is active (``A > 0, r > 1 + eps_high`` or
    ``A < 0, r < 1 - eps_low``), the second ``A < 0`` tokens bounded by the
    dual clip (``r > c``). Ties (``r`` exactly at a boundary) count as
    unclipped. The two never fire together: the ordinary clip binds an
    ``A < 0`` token only at ``r < 1 - eps_low``, where ``-A r < -A c``.

    With any ratios (e.g. R²VPO's, which are never clipped) this is where the
    clipped loss *would* remove the gradient.
    """
    adv = token_advantages(advantages, ratio)
    loss_unclipped = -adv * ratio
    loss_clipped = -adv * torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    clip_fired = loss_clipped > loss_unclipped
    if dual_clip is None:
        return clip_fired, torch.zeros_like(clip_fired)
    loss = torch.maximum(loss_unclipped, loss_clipped)
    dual_fired = (adv < 0) & (loss > -adv * dual_clip)
    return clip_fired, dual_fired


def abs_advantage_share(
    advantages: torch.Tensor, where: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum of |A| over valid tokens in where, sum of |A| over valid tokens)``, float64 0-d each.

    Their ratio is the |A|-weighted share of the tokens in ``where`` (e.g. the
    gradient that clipping removes, :func:`clip_regions`); callers sum both
    over micro-batches and ranks before dividing. ``advantages`` ``[R]`` or
    ``[R, L]``; ``where`` and ``mask`` ``[R, L]``.
    """
    valid = bool_mask(mask)
    a = token_advantages(advantages, valid.to(torch.float64)).detach().abs().double()
    zero = torch.zeros_like(a)
    return torch.where(valid & where.bool(), a, zero).sum(), torch.where(valid, a, zero).sum()


def k3_kl(logp: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(pi || pi_ref) per token, ``[R, L]``, always ``>= 0``.

    ``exp(d) - d - 1`` with ``d = clamp(logp_ref - logp, -20, 20)``. Unmasked:
    the caller aggregates with its mask.
    """
    _check_same_shape("logp", logp, "logp_ref", logp_ref)
    d = torch.clamp(logp_ref - logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    # expm1(d) - d instead of exp(d) - d - 1: no cancellation near d = 0, and
    # (with expm1 >= d and monotone rounding) never a tiny negative value.
    return (torch.expm1(d) - d).clamp_min(0.0)


# --------------------------------------------------------------------------- #
# Aggregation (grpo_base.md §5)
# --------------------------------------------------------------------------- #
def per_sequence_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values [R, L]`` over each row's valid tokens, ``[R]``.

    A fully masked row gives 0. Gradients flow; detach at the call site if
    the result is only for logging.
    """
    _check_token_tensor("values", values)
    _check_same_shape("values", values, "mask", mask)
    valid = bool_mask(mask)
    sums = torch.where(valid, values, torch.zeros_like(values)).sum(dim=-1)
    counts = valid.sum(dim=-1).to(values.dtype).clamp_min(1.0)
    return sums / counts


def informative_token_count(mask: torch.Tensor, informative: torch.Tensor) -> torch.Tensor:
    """Valid tokens of the rows whose raw advantage is non-zero (``informative`` bool ``[R]``), 0-d int."""
    _check_token_tensor("mask", mask)
    if informative.shape != mask.shape[:1]:
        raise ValueError(
            f"informative must be a [R] row mask, got shape {tuple(informative.shape)} for mask {tuple(mask.shape)}"
        )
    return (bool_mask(mask) & informative.bool()[:, None]).sum()


def aggregate_token_loss(
    token_loss: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "token-mean",
    *,
    global_num_tokens: Scalar | None = None,
    global_num_seqs: Scalar | None = None,
    norm_constant: float | None = None,
    informative: torch.Tensor | None = None,
    global_num_informative_tokens: Scalar | None = None,
) -> torch.Tensor:
    """Reduce ``token_loss [R, L]`` to a scalar whose sum over micro-batches
    and data-parallel ranks is the full optimizer-step loss.

    Modes (S = global number of sequences, N = global number of tokens,
    N_inf = global number of valid tokens of informative rows):
      * ``token-mean``: ``sum_valid(loss) / N``.
      * ``informative-token-mean``: ``sum_valid(loss) / N_inf``. A row is
        informative when its raw GRPO advantage is non-zero; the tokens of
        the other rows (zero-variance groups) stay in the numerator (their
        KL / R²VPO terms) but not in the divisor, so the step size does not
        shrink as such groups fill the batch.
      * ``seq-mean-token-mean``: ``sum_rows(mean_valid_tokens(loss)) / S``.
      * ``seq-mean-token-sum-norm`` (Dr.GRPO):
        ``sum_rows(sum_valid_tokens(loss) / norm_constant) / S``.

    ``global_num_tokens`` / ``global_num_seqs`` / ``global_num_informative_tokens``
    are the counts of the whole step (summed over micro-batches, all-reduced
    over DP). ``None`` means the local count, i.e. this call sees the whole
    step (``informative-token-mean`` then needs ``informative``, bool ``[R]``).
    The local sequence count is the number of rows with at least one valid
    token, so padding rows added by batching never dilute the mean. A zero
    count gives a zero loss (the caller skips such an update).
    """
    _check_token_tensor("token_loss", token_loss)
    _check_same_shape("token_loss", token_loss, "mask", mask)
    valid = bool_mask(mask)
    masked = torch.where(valid, token_loss, torch.zeros_like(token_loss))

    if mode == "token-mean":
        n = valid.sum() if global_num_tokens is None else global_num_tokens
        return masked.sum() / _count_divisor(n, token_loss)
    if mode == "informative-token-mean":
        n = global_num_informative_tokens
        if n is None:
            if informative is None:
                raise ValueError(
                    "loss_agg_mode 'informative-token-mean' needs global_num_informative_tokens "
                    "or the informative row mask"
                )
            n = informative_token_count(valid, informative)
        if float(n) == 0:
            # Only zero-advantage rows: their KL / R2VPO terms alone must not make an update.
            return (masked * 0.0).sum()
        return masked.sum() / _count_divisor(n, token_loss)

    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg_mode must be one of {LOSS_AGG_MODES}, got {mode!r}")

    s = valid.any(dim=-1).sum() if global_num_seqs is None else global_num_seqs
    if mode == "seq-mean-token-mean":
        seq_values = per_sequence_mean(token_loss, valid)
    else:
        if norm_constant is None:
            raise ValueError("norm_constant is required for loss_agg_mode 'seq-mean-token-sum-norm'")
        if not norm_constant > 0:
            raise ValueError(f"norm_constant must be > 0, got {norm_constant}")
        seq_values = masked.sum(dim=-1) / norm_constant
    return seq_values.sum() / _count_divisor(s, token_loss)


# --------------------------------------------------------------------------- #
# R²VPO (r2vpo.md)
# --------------------------------------------------------------------------- #
def r2vpo_token_loss(
    logp: torch.Tensor,
    logp_mu: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    lam: Scalar,
    *,
    center: str = "one",
    ratio_mean: Scalar | None = None,
    max_ratio: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """R²VPO primal loss per token: ``-r * A + lam * (r - c)^2`` (minimised).

    ``r = policy_ratio(logp, logp_mu)`` against the behaviour policy; no
    clipping of the objective. Per-token gradient w.r.t. ``logp`` is
    ``-r (A - 2 lam (r - c))``.

    Args:
        logp, logp_mu: ``[R, L]`` current and behaviour per-token log-probs.
        advantages: ``[R]`` or ``[R, L]``.
        mask: ``[R, L]`` valid-token mask.
        lam: dual variable (float or 0-d tensor); treated as a constant.
        center: ``"one"`` (c = 1) or ``"batch_mean"`` (c = ``ratio_mean``, the
            detached global mean of r, required in that case).
        max_ratio: numerical guard, ``None`` = off. Tokens with r > max_ratio
            get zero loss and are left out of the variance statistics; they
            still count in ``num_tokens`` (the step's N is a layout quantity
            fixed before the forward pass).

    Returns:
        ``token_loss [R, L]`` (0 at masked/excluded positions) and detached
        0-d stats: ``sum_sq_dev`` (float64, sum of (r - c)^2 over kept
        tokens), ``num_tokens`` (valid tokens), ``num_kept``, ``ratio_sum``
        (float64, over kept tokens; global ratio_sum / num_kept is the
        ``batch_mean`` centre), ``max_ratio_fired`` (fraction of valid tokens
        excluded), and ``mask`` (the bool mask of kept tokens).
    """
    _check_token_tensor("logp", logp)
    _check_same_shape("logp", logp, "mask", mask)
    if center not in R2VPO_CENTERS:
        raise ValueError(f"center must be one of {R2VPO_CENTERS}, got {center!r}")
    if center == "batch_mean":
        if ratio_mean is None:
            raise ValueError("center='batch_mean' requires ratio_mean (the detached global mean of r)")
        c = torch.as_tensor(ratio_mean, dtype=logp.dtype, device=logp.device).detach()
    else:
        if ratio_mean is not None:
            raise ValueError("ratio_mean is only used with center='batch_mean'; got center='one'")
        c = torch.ones((), dtype=logp.dtype, device=logp.device)
    if is_real(lam) and not (0.0 <= float(lam) < math.inf):
        raise ValueError(f"lam must be a finite number >= 0, got {lam}")
    if max_ratio is not None and not max_ratio > 0:
        raise ValueError(f"max_ratio must be > 0 or None, got {max_ratio}")
    # lam is controller state: it must not receive (or pass) gradient.
    lam_t = torch.as_tensor(lam, dtype=logp.dtype, device=logp.device).detach()

    valid = bool_mask(mask)
    adv = token_advantages(advantages, logp)
    ratio = policy_ratio(logp, logp_mu)

    if max_ratio is not None:
        fired = valid & (ratio.detach() > max_ratio)
        keep = valid & ~fired
    else:
        fired = torch.zeros_like(valid)
        keep = valid

    loss = -ratio * adv + lam_t * (ratio - c) ** 2
    token_loss = torch.where(keep, loss, torch.zeros_like(loss))

    with torch.no_grad():
        # float64 statistics: they are summed over many tokens and ranks and
        # feed the dual update, where float32 round-off would be visible.
        r64 = ratio.detach().double()
        zero = torch.zeros_like(r64)
        num_tokens = valid.sum()
        stats = {
            "sum_sq_dev": torch.where(keep, (r64 - c.double()) ** 2, zero).sum(),
            "num_tokens": num_tokens,
            "num_kept": keep.sum(),
            "ratio_sum": torch.where(keep, r64, zero).sum(),
            "max_ratio_fired": fired.sum().double() / num_tokens.double().clamp_min(1.0),
            "mask": keep,
        }
    return token_loss, stats


def ratio_variance(sum_sq_dev: Scalar, num_tokens: Scalar, group: Any = None) -> float:
    """Global ratio variance ``V_hat = sum(sum_sq_dev) / sum(num_tokens)``.

    With ``group`` not ``None`` both numbers are summed over that
    ``torch.distributed`` group in a single all-reduce of a float64 pair
    (on the group's backend device). ``group=None`` uses the local values. Returns 0.0 when there
    are no tokens.
    """
    device = sum_sq_dev.device if isinstance(sum_sq_dev, torch.Tensor) else torch.device("cpu")
    buf = torch.stack(
        [
            torch.as_tensor(sum_sq_dev, dtype=torch.float64, device=device).detach().reshape(()),
            torch.as_tensor(num_tokens, dtype=torch.float64, device=device).detach().reshape(()),
        ]
    )
    if group is not None:
        if not comm.is_distributed():
            raise RuntimeError("ratio_variance: a process group was given but torch.distributed is not initialised")
        buf = comm.all_reduce(buf, group=group)
    total_sq, total_n = buf.tolist()
    return total_sq / total_n if total_n > 0 else 0.0


class DualVariableController:
    """Holds the R²VPO dual variable ``lam`` and updates it once per optimizer step.

    ``update(v_hat)`` takes the detached global ratio variance of the step just
    taken (see :func:`ratio_variance`) and applies the configured rule:

    * additive: ``lam <- clip(lam + eta_lam (V_hat - delta), 0, lam_max)``
    * multiplicative: ``lam <- clip(lam exp(eta_mult (V_hat/delta - 1)), lam_min, lam_max)``
    """

    _STATE_KEYS = ("lam", "num_updates", "last_v_hat")

    def __init__(self, config: R2VPOConfig) -> None:
        self.config = config
        self._lam = config.initial_lam
        self.num_updates = 0
        # NaN until the first update, so a logged value is never a fake 0.
        self.last_v_hat = math.nan

    @property
    def lam(self) -> float:
        """Current dual variable (>= 0), to pass to :func:`r2vpo_token_loss`."""
        return self._lam

    def update(self, v_hat: float) -> float:
        """Apply one dual step with the global ``V_hat``; returns the new ``lam``."""
        v = float(v_hat)
        if not (math.isfinite(v) and v >= 0):
            # A NaN here would silently poison lam for the rest of the run.
            raise ValueError(f"v_hat must be a finite number >= 0, got {v_hat}")
        cfg = self.config
        if cfg.dual_update == "additive":
            lam = self._lam + cfg.eta_lam * (v - cfg.delta)
            lam = min(max(lam, 0.0), cfg.lam_max)
        else:
            # Cap the exponent: math.exp overflows past ~709, and any value
            # this large is clipped to lam_max anyway.
            expo = min(cfg.eta_mult * (v / cfg.delta - 1.0), 700.0)
            lam = self._lam * math.exp(expo)
            lam = min(max(lam, cfg.lam_min), cfg.lam_max)
        self._lam = float(lam)
        self.num_updates += 1
        self.last_v_hat = v
        return self._lam

    def state_dict(self) -> dict[str, float | int]:
        return {"lam": float(self._lam), "num_updates": int(self.num_updates), "last_v_hat": float(self.last_v_hat)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = [k for k in self._STATE_KEYS if k not in state]
        if missing:
            raise KeyError(f"DualVariableController.load_state_dict: missing keys {missing} (expected {list(self._STATE_KEYS)})")
        lam = float(state["lam"])
        if not (math.isfinite(lam) and 0.0 <= lam <= self.config.lam_max):
            raise ValueError(f"DualVariableController.load_state_dict: lam must be in [0, {self.config.lam_max}], got {lam}")
        self._lam = lam
        self.num_updates = int(state["num_updates"])
        self.last_v_hat = float(state["last_v_hat"])
