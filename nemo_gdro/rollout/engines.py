"""Rollout engine builders for ``rollout.engine`` (see :data:`nemo_gdro.registries.ROLLOUT_ENGINES`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nemo_gdro.rollout.hf_engine import HFRolloutEngine, SamplingConfig


@dataclass(frozen=True)
class EngineRequest:
    """Everything an engine builder gets.

    hf_config: the policy's ``transformers`` config (architecture, vocab).
    tokenizer: the run's tokenizer (engine contract: encode / decode / stop ids).
    sampling: sampling options of this engine (training or evaluation).
    seed: the engine's base seed.
    role: ``train`` or ``eval``.
    """

    hf_config: Any
    tokenizer: Any
    sampling: SamplingConfig
    seed: int
    role: str = "train"


def build_hf_engine(request: EngineRequest) -> HFRolloutEngine:
    """``transformers`` generation on CPU (or one GPU), weights pushed after every update."""
    return HFRolloutEngine(request.hf_config, request.tokenizer, request.sampling, seed=request.seed)
