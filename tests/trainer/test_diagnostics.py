"""DynaMO's beta min/max from the mini-batch's no-grad pass equal the extremes the loss applies per micro-batch."""

from __future__ import annotations

import torch

from nemo_gdro.algorithms.dynamo_modulation import DynamoModulationConfig, modulate_advantages
from nemo_gdro.algorithms.token_stats import full_vocab_token_stats
from nemo_gdro.parallel.rows import DataParallel
from nemo_gdro.stages.base import MinibatchView
from nemo_gdro.stages.modulation import DynamoModulation, NoModulation
from nemo_gdro.trainer.diagnostics import modulation_extremes


def test_extremes_match_the_factors_of_every_micro_batch():
    g = torch.Generator().manual_seed(3)
    rows, length, vocab = 8, 6, 11
    logits = torch.randn(rows, length, vocab, generator=g, dtype=torch.float64) * 2
    tokens = torch.randint(0, vocab, (rows, length), generator=g)
    mask = torch.arange(length)[None, :] < torch.randint(1, length + 1, (rows, 1), generator=g)
    behaviour = full_vocab_token_stats(logits + 0.5 * torch.randn(rows, length, vocab, generator=g, dtype=torch.float64),
                                       tokens)[0]
    logp, entropy, ebar = full_vocab_token_stats(logits, tokens)
    config = DynamoModulationConfig(tau=0.5, gamma=5.0)  # so that beta_stab spreads over (lam_min, 1]
    stage = DynamoModulation(config, DataParallel())
    view = MinibatchView(advantages=torch.randn(rows, generator=g, dtype=torch.float64), behaviour_logp=behaviour,
                         mask=mask, current={"logp": logp, "entropy": entropy, "ebar": ebar})
    context = stage.prepare(view)
    out = modulation_extremes(stage, view, context, DataParallel())
    lo = {"beta_comp": float("inf"), "beta_stab": float("inf")}
    hi = {"beta_comp": -float("inf"), "beta_stab": -float("inf")}
    for part in torch.split(torch.arange(rows), 3):  # what the loss computes micro-batch by micro-batch
        _, m = modulate_advantages(view.advantages[part][:, None].expand(-1, length), logp[part], behaviour[part],
                                   entropy[part], mask[part], config, ebar_exact=ebar[part], stats=context)
        for name in lo:
            lo[name] = min(lo[name], float(m[f"{name}/min"]))
            hi[name] = max(hi[name], float(m[f"{name}/max"]))
    for name in lo:
        assert out[f"dynamo/{name}/min"] == lo[name] and out[f"dynamo/{name}/max"] == hi[name]
    assert out["dynamo/beta_stab/min"] < out["dynamo/beta_stab/max"] <= 1.0
    assert out["dynamo/beta_comp/max"] > 1.0
    assert modulation_extremes(NoModulation(), view, None, DataParallel()) == {}
