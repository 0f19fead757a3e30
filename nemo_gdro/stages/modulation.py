"""Token modulation: none, or DynaMO's gradient-aware advantage modulation (dynamo.md §2)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from nemo_gdro.algorithms.dynamo_modulation import (
    DynamoModulationConfig,
    ModulationStats,
    modulate_advantages,
    modulation_stats,
)
from nemo_gdro.parallel.rows import DataParallel
from nemo_gdro.stages.base import MinibatchView
from nemo_gdro.stages.context import StageContext

#: Token-mean diagnostics of the modulation, logged as ``dynamo/<key>``.
MODULATION_METRICS = ("beta_comp/mean", "beta_stab/mean", "frac_beta_stab_below_0.95", "adv_ratio_mean")


class NoModulation:
    """Every token keeps its response's advantage."""

    needs_current_policy = False
    needs_ebar = False

    @classmethod
    def from_context(cls, ctx: StageContext) -> NoModulation:
        return cls()

    def prepare(self, view: MinibatchView) -> Any:
        return None

    def modulate(
        self, advantages: torch.Tensor, stats: Mapping[str, torch.Tensor], behaviour_logp: torch.Tensor,
        mask: torch.Tensor, context: Any,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return advantages, {}

    def metrics(self, sums: Mapping[str, float], num_tokens: float) -> dict[str, float]:
        return {}

    def stateful(self) -> dict[str, object]:
        return {}


class DynamoModulation:
    """``A~ = A * beta_comp * beta_stab`` per token, both factors detached.

    With ``scope=minibatch`` (default) the normalisation statistics (H_min,
    H_max, max |dH|) come from a no-grad pass of the pre-update policy over
    the whole mini-batch, reduced over DP ranks, so the result does not
    depend on micro-batching or the DP size.
    """

    def __init__(self, config: DynamoModulationConfig, dp: DataParallel) -> None:
        self.config = config
        self.dp = dp
        self.needs_current_policy = config.scope == "minibatch"
        # ebar=sequence_mean derives its centre from logp and entropy alone.
        self.needs_ebar = config.ebar == "exact"

    @classmethod
    def from_context(cls, ctx: StageContext) -> DynamoModulation:
        return cls(ctx.setup.dynamo_modulation, ctx.dp)

    def prepare(self, view: MinibatchView) -> ModulationStats | None:
        if not self.needs_current_policy:
            return None
        now = view.current
        assert now is not None, "DynamoModulation(scope=minibatch) needs the current policy's token statistics"
        adv_tok = view.advantages[:, None].expand_as(now["logp"])
        stats = modulation_stats(
            adv_tok, now["logp"], view.behaviour_logp, now["entropy"], view.mask, self.config, ebar_exact=now.get("ebar")
        )
        return stats.reduce(group=self.dp.group) if self.dp.size > 1 else stats

    def modulate(
        self, advantages: torch.Tensor, stats: Mapping[str, torch.Tensor], behaviour_logp: torch.Tensor,
        mask: torch.Tensor, context: ModulationStats | None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        adv, metrics = modulate_advantages(
            advantages, stats["logp"].detach(), behaviour_logp, stats["entropy"].detach(), mask, self.config,
            ebar_exact=stats.get("ebar"), stats=context,
        )
        valid = float(mask.sum())
        # Token-weighted sums: divided by the mini-batch's token count after the reduction.
        sums = {f"dynamo/{k}": metrics[k].double() * valid for k in MODULATION_METRICS}
        return adv, sums

    def metrics(self, sums: Mapping[str, float], num_tokens: float) -> dict[str, float]:
        n = max(num_tokens, 1.0)
        return {f"dynamo/{k}": sums[f"dynamo/{k}"] / n for k in MODULATION_METRICS}

    def stateful(self) -> dict[str, object]:
        return {}
