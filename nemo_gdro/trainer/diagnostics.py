"""Diagnostics that need a reduction the loss channel does not do (it only sums).

:func:`modulation_extremes`: DynaMO's ``beta_comp`` / ``beta_stab`` min and
max over the optimizer mini-batch and every DP rank (dynamo.md §5), computed
from the no-grad pass of the pre-update policy that the mini-batch scope
already makes (:attr:`MinibatchView.current`), with the same normalisation
statistics the loss uses: the factors the gradient pass applies, without a
second forward. With ``scope: microbatch`` there is no such pass (and the
factors depend on the micro-batch packing), so nothing is reported.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from nemo_gdro.parallel import comm

__all__ = ["modulation_extremes"]


def modulation_extremes(modulation: Any, view: Any, context: Any, dp: Any) -> dict[str, float]:
    """``dynamo/beta_{comp,stab}/{min,max}`` of the mini-batch (collective over DP when reported), else ``{}``."""
    from nemo_gdro.algorithms.dynamo_modulation import modulate_advantages
    from nemo_gdro.stages.modulation import DynamoModulation

    if not isinstance(modulation, DynamoModulation) or view.current is None:
        return {}
    import torch.distributed as dist

    now = view.current
    adv = view.advantages[:, None].expand_as(now["logp"])
    _, m = modulate_advantages(
        adv, now["logp"], view.behaviour_logp, now["entropy"], view.mask, modulation.config,
        ebar_exact=now.get("ebar"), stats=context,
    )
    names = ("beta_comp", "beta_stab")
    if int(m["num_tokens"]) > 0:
        local = [v for name in names for v in (-float(m[f"{name}/min"]), float(m[f"{name}/max"]))]
    else:  # a rank without tokens (a placeholder row) must not move the extremes
        local = [-math.inf, -math.inf] * len(names)
    buf = torch.tensor(local, dtype=torch.float64)
    if dp.size > 1:
        buf = comm.all_reduce(buf, op=dist.ReduceOp.MAX, group=dp.group)
    out: dict[str, float] = {}
    for i, name in enumerate(names):
        out[f"dynamo/{name}/min"] = -float(buf[2 * i])
        out[f"dynamo/{name}/max"] = float(buf[2 * i + 1])
    return out
