"""Tests of nemo_gdro.algorithms.token_stats."""

from __future__ import annotations

import math

import pytest
import torch

from nemo_gdro.algorithms.token_stats import full_vocab_token_stats

F64 = torch.float64


# --------------------------------------------------------------------------- #
# token statistics
# --------------------------------------------------------------------------- #
def _brute_stats(logits_row: list[float], tok: int, temperature: float) -> tuple[float, float, float]:
    z = [x / temperature for x in logits_row]
    m = max(z)
    e = [math.exp(x - m) for x in z]
    s = sum(e)
    pi = [x / s for x in e]
    h = -sum(p * math.log(p) for p in pi)
    ebar = sum(p * p * (math.log(p) + h) for p in pi)
    return math.log(pi[tok]), h, ebar


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_full_vocab_token_stats_brute_force(temperature):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, generator=gen, dtype=F64) * 2
    tokens = torch.randint(0, 5, (2, 3), generator=gen)
    logp, h, ebar = full_vocab_token_stats(logits, tokens, temperature=temperature)
    assert logp.shape == h.shape == ebar.shape == (2, 3)
    for r in range(2):
        for t in range(3):
            lp, hh, eb = _brute_stats(logits[r, t].tolist(), int(tokens[r, t]), temperature)
            assert logp[r, t].item() == pytest.approx(lp, abs=1e-12)
            assert h[r, t].item() == pytest.approx(hh, abs=1e-12)
            assert ebar[r, t].item() == pytest.approx(eb, abs=1e-12)
    if temperature != 1.0:  # temperature is really applied
        _, h1, _ = full_vocab_token_stats(logits, tokens, temperature=1.0)
        assert not torch.allclose(h, h1)


def test_full_vocab_token_stats_upcasts_low_precision():
    logits = torch.randn(4, 7).to(torch.bfloat16)
    logp, h, ebar = full_vocab_token_stats(logits, torch.zeros(4, dtype=torch.long))
    assert logp.dtype == h.dtype == ebar.dtype == torch.float32


