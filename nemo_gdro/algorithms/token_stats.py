"""Full-vocabulary reference of the per-token statistics the actor computes.

The training path computes the same three numbers without materialising
``[tokens, vocab]`` probabilities, at every TP size
(:mod:`nemo_gdro.parallel.vocab_parallel`, :mod:`nemo_gdro.parallel.fused_linear_stats`);
this module is the reference (test oracle) they are checked against.
"""

from __future__ import annotations

import torch

from nemo_gdro.algorithms._validation import compute_dtype

__all__ = ["full_vocab_token_stats"]


def full_vocab_token_stats(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference per-token statistics from full-vocabulary logits.

    With ``pi = softmax(logits / temperature)`` (computed in at least fp32):

    Args:
        logits: ``[..., V]`` raw logits.
        tokens: ``[...]`` int sampled token ids.
        temperature: the sampling temperature (> 0).
    Returns:
        ``(logp, entropy, ebar_exact)``, each ``[...]`` in nats:
        ``logp = log pi(token)``, ``entropy = H = -sum_a pi_a log pi_a`` and
        ``ebar_exact = sum_a pi_a^2 (log pi_a + H)``.

    This materialises ``[..., V]`` probabilities; it is the reference the
    vocabulary-parallel version is tested against.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if tokens.shape != logits.shape[:-1]:
        raise ValueError(f"tokens must have shape {tuple(logits.shape[:-1])}, got {tuple(tokens.shape)}")
    z = logits.to(compute_dtype(logits)) / temperature
    log_pi = torch.log_softmax(z, dim=-1)
    pi = log_pi.exp()
    logp = torch.gather(log_pi, -1, tokens.long().unsqueeze(-1)).squeeze(-1)
    # pi * log pi -> 0 as pi -> 0; exp underflow gives pi = 0 with finite log_pi, so no NaN.
    entropy = -(pi * log_pi).sum(dim=-1)
    ebar = (pi * pi * (log_pi + entropy.unsqueeze(-1))).sum(dim=-1)
    return logp, entropy, ebar
