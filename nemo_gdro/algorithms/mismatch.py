"""Engine-vs-actor log-prob mismatch and truncated importance sampling (TIS).

Rollouts come from an inference engine (vLLM, possibly FP8) whose numerics
differ from the training actor's. With per-token log-probs of the sampled
tokens from both (``[R, S-1]``, aligned like ``behaviour_logp``; ``mask`` True on
response tokens):

- ``token_mult_prob_error`` (NeMo-RL's name):
  ``(1 / N) * sum_{masked t} exp(|logp_actor_t - logp_engine_t|)`` over the
  ``N`` response tokens, i.e. the mean multiplicative probability error of the
  sampled tokens; 1.0 means the engines agree.
- ``mean_abs_logp_diff``, ``max_abs_logp_diff``, ``mean_logp_diff``
  (``actor - engine``).
- TIS weights ``min(exp(logp_actor_old - logp_engine), C)`` per token: the
  importance ratio between the policy the loss assumes sampled the tokens and
  the engine that did, truncated at ``C`` (default 2).

Pure torch. Under data parallelism, all-reduce ``MismatchSums.sums`` (SUM) and
``MismatchSums.max_abs`` (MAX) over ranks, then call ``finalize``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "MISMATCH_ROWS", "MismatchStats", "MismatchSums", "logprob_mismatch", "mismatch_row_sums", "mismatch_sums",
    "truncated_is_weights",
]

#: Per-row partial sums of :func:`mismatch_row_sums`, in ``MismatchSums.sums`` order, then the row's max ``|d|``.
MISMATCH_ROWS = ("mismatch_n", "mismatch_exp_abs", "mismatch_abs", "mismatch_diff", "mismatch_max_abs")


@dataclass(frozen=True)
class MismatchStats:
    """Mismatch statistics over ``num_tokens`` response tokens (log-probs in nats).

    With no tokens the statistics are neutral: error 1.0, differences 0.0.
    """

    num_tokens: int
    token_mult_prob_error: float
    mean_abs_logp_diff: float
    max_abs_logp_diff: float
    mean_logp_diff: float

    def as_metrics(self, prefix: str = "rollout/engine_") -> dict[str, float]:
        return {
            f"{prefix}token_mult_prob_error": self.token_mult_prob_error,
            f"{prefix}mean_abs_logp_diff": self.mean_abs_logp_diff,
            f"{prefix}max_abs_logp_diff": self.max_abs_logp_diff,
            f"{prefix}mean_logp_diff": self.mean_logp_diff,
        }


@dataclass(frozen=True)
class MismatchSums:
    """Reducible partial sums.

    sums: float64 ``[4]``: token count, sum of ``exp|d|``, sum of ``|d|``, sum of ``d``
        (``d = actor - engine``).
    max_abs: float64 ``[]``: largest ``|d|`` (0 without tokens).
    """

    sums: torch.Tensor
    max_abs: torch.Tensor

    def finalize(self) -> MismatchStats:
        n, s_exp, s_abs, s_d = (float(x) for x in self.sums)
        if n == 0:
            return MismatchStats(0, 1.0, 0.0, 0.0, 0.0)
        return MismatchStats(int(round(n)), s_exp / n, s_abs / n, float(self.max_abs), s_d / n)

    @classmethod
    def from_rows(cls, rows: dict[str, torch.Tensor]) -> MismatchSums:
        """Sum the per-row values of :func:`mismatch_row_sums` (``MISMATCH_ROWS`` keys, each ``[R]``)."""
        sums = torch.stack([rows[k].double().sum() for k in MISMATCH_ROWS[:4]])
        max_abs = rows[MISMATCH_ROWS[4]].double()
        return cls(sums.cpu(), (max_abs.max() if max_abs.numel() else torch.zeros((), dtype=torch.float64)).cpu())


def _check(actor_logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if actor_logp.shape != engine_logp.shape:
        raise ValueError(
            f"actor_logp {list(actor_logp.shape)} and engine_logp {list(engine_logp.shape)} must have the same shape"
        )
    if mask is None:
        return torch.ones(actor_logp.shape, dtype=torch.bool, device=actor_logp.device)
    if mask.shape != actor_logp.shape or mask.dtype != torch.bool:
        raise ValueError(f"mask must be bool {list(actor_logp.shape)}, got {mask.dtype} {list(mask.shape)}")
    return mask


def mismatch_sums(
    actor_logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor | None = None
) -> MismatchSums:
    """Partial sums of the mismatch over the masked tokens (float64; see ``MismatchSums``)."""
    m = _check(actor_logp, engine_logp, mask)
    d = (actor_logp.double() - engine_logp.double())[m]
    a = d.abs()
    sums = torch.stack([torch.tensor(float(d.numel()), dtype=torch.float64), a.exp().sum(), a.sum(), d.sum()])
    max_abs = a.max() if a.numel() else torch.zeros((), dtype=torch.float64)
    return MismatchSums(sums.cpu(), max_abs.cpu())


@torch.no_grad()
def mismatch_row_sums(
    actor_logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The partial sums of :func:`mismatch_sums` per row: ``MISMATCH_ROWS`` -> float64 ``[R]``
    (for a pass that reports one value per row; :meth:`MismatchSums.from_rows` adds them up)."""
    m = _check(actor_logp, engine_logp, mask)
    d = actor_logp.detach().double() - engine_logp.detach().double()
    a = torch.where(m, d.abs(), torch.zeros_like(d))
    values = (m.double().sum(-1), torch.where(m, a.exp(), torch.zeros_like(a)).sum(-1), a.sum(-1),
              torch.where(m, d, torch.zeros_like(d)).sum(-1), a.amax(-1) if a.shape[-1] else a.sum(-1))
    return dict(zip(MISMATCH_ROWS, values))


def logprob_mismatch(
    actor_logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor | None = None
) -> MismatchStats:
    """Mismatch statistics of one rank's tokens (``[R, S-1]`` log-probs, bool mask)."""
    return mismatch_sums(actor_logp, engine_logp, mask).finalize()


def truncated_is_weights(
    actor_old_logp: torch.Tensor,
    engine_logp: torch.Tensor,
    mask: torch.Tensor | None = None,
    cap: float = 2.0,
) -> torch.Tensor:
    """Per-token TIS weights ``min(exp(actor_old_logp - engine_logp), cap)``, float32, no grad.

    Args:
        actor_old_logp: ``[R, S-1]`` log-probs of the sampled tokens under the
            policy the loss treats as the behaviour policy (the actor's recomputed
            ``behaviour_logp``).
        engine_logp: ``[R, S-1]`` the engine's log-probs of the same tokens.
        mask: optional bool ``[R, S-1]``; weights are 0 outside it.
        cap: truncation ``C > 0``.

    Computed as ``exp(min(d, log C))`` (equal, and never overflows).
    """
    if not (isinstance(cap, (int, float)) and math.isfinite(cap) and cap > 0):
        raise ValueError(f"TIS cap must be a finite number > 0, got {cap!r}")
    m = _check(actor_old_logp, engine_logp, mask)
    with torch.no_grad():
        d = actor_old_logp.detach().double() - engine_logp.detach().double()
        w = torch.exp(torch.clamp(d, max=math.log(cap)))
        return torch.where(m, w, torch.zeros_like(w)).to(torch.float32)
