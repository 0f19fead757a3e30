"""Sampling options shared by the engines, and per-row seeded token sampling.

Each row samples with its own ``torch.Generator``, so a row's tokens depend
only on its own seed and logits, never on the other rows of the batch or on
the caller's global RNG stream.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["SamplingConfig", "filter_logits", "sample_rows"]


@dataclass(frozen=True)
class SamplingConfig:
    """Sampling options.

    temperature: softmax temperature (> 0) when sampling.
    top_p: nucleus mass in ``(0, 1]``; 1.0 disables.
    top_k: keep the ``k`` most likely tokens; 0 disables.
    max_new_tokens: response length cap in tokens (including the stop token).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 16

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"sampling.temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"sampling.top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"sampling.max_new_tokens must be >= 1, got {self.max_new_tokens}")


def filter_logits(logits: torch.Tensor, s: SamplingConfig) -> torch.Tensor:
    """``[N, V]`` float logits -> temperature-scaled logits with top-k / top-p removed (``-inf``).

    Order as in common engines: temperature, then top-k, then top-p (the
    smallest set of most likely tokens whose mass reaches ``top_p``; the most
    likely token is always kept).
    """
    x = logits.float() / s.temperature
    V = x.shape[-1]
    if 0 < s.top_k < V:
        kth = torch.topk(x, s.top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        probs = torch.softmax(sorted_x, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs
        drop_sorted = mass_before >= s.top_p  # the first token has mass_before 0 and stays
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        x = x.masked_fill(drop, float("-inf"))
    return x


def sample_rows(
    logits: torch.Tensor, s: SamplingConfig, generators: Sequence[torch.Generator] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row: ``(tokens int64 [N], logp float32 [N])``.

    ``generators`` None means greedy (argmax, the lowest id on ties; ``logp``
    under the raw logits). Otherwise row ``j`` draws one uniform from
    ``generators[j]`` and inverts the CDF of its filtered distribution; ``logp``
    is the log-prob of the drawn token under that (temperature-scaled,
    truncated) distribution -- what the engine actually sampled from.
    """
    if generators is None:
        tok = torch.argmax(logits, dim=-1)
        logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, tok[:, None])[:, 0]
        return tok, logp
    if len(generators) != logits.shape[0]:
        raise ValueError(f"{len(generators)} generators for {logits.shape[0]} rows")
    x = filter_logits(logits, s)
    logp_all = torch.log_softmax(x, dim=-1)
    cdf = torch.cumsum(logp_all.double().exp(), dim=-1)
    u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in generators])
    # side="right": the drawn token has cdf[i-1] <= u < cdf[i], so it has mass > 0.
    tok = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]
    tok = tok.clamp(max=logits.shape[-1] - 1)
    return tok, logp_all.gather(-1, tok[:, None])[:, 0]
