"""Rollout engine builders for ``rollout.engine`` (see :data:`nemo_gdro.registries.ROLLOUT_ENGINES`).

Both engines sample prompt ``i`` with its own seed (``rollout/seeds.py``), so
rollouts do not depend on the data-parallel layout. One vLLM engine serves a
process: the evaluation engine is then a view of the training one with the
evaluation sampling settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nemo_gdro.rollout.sampling import SamplingConfig


@dataclass(frozen=True)
class EngineRequest:
    """Everything an engine builder gets.

    hf_config: the policy's ``transformers`` config (architecture, vocab).
    tokenizer: the run's tokenizer (engine contract: encode / decode / stop ids).
    sampling: sampling options of this engine (training or evaluation).
    seed: the engine's base seed (initial weights; sampling seeds come per prompt).
    role: ``train`` or ``eval``.
    options: the engine's own typed options (``rollout.vllm``), or ``None``.
    shared: the training engine, when building the evaluation one.
    """

    hf_config: Any
    tokenizer: Any
    sampling: SamplingConfig
    seed: int
    role: str = "train"
    options: Any = None
    shared: Any = None


def build_hf_engine(request: EngineRequest) -> Any:
    """``transformers`` generation on CPU (or one GPU), weights pushed after every update."""
    from nemo_gdro.rollout.hf_engine import HFRolloutEngine

    return HFRolloutEngine(request.hf_config, request.tokenizer, request.sampling, seed=request.seed)


class SharedEngineView:
    """The training engine with other sampling settings (one ``vllm.LLM`` per process)."""

    def __init__(self, engine: Any, sampling: SamplingConfig) -> None:
        self.engine = engine
        self.sampling = sampling

    def load_weights(self, weights: Any, version: int) -> None:
        if version != self.engine.policy_version:
            self.engine.load_weights(weights, version)

    def generate(self, records: Any, n_per_prompt: Any, seeds: Any, *, greedy: bool = False) -> Any:
        return self.engine.generate(records, n_per_prompt, seeds, greedy=greedy, sampling=self.sampling)


def build_vllm_engine(request: EngineRequest) -> Any:
    """A colocated ``vllm.LLM`` (external launcher under torchrun); built before the actor allocates memory."""
    if request.role == "eval" and request.shared is not None:
        return SharedEngineView(request.shared, request.sampling)
    from nemo_gdro.rollout.vllm_engine import VLLMRolloutEngine

    engine = VLLMRolloutEngine(request.hf_config, request.tokenizer, request.sampling, request.options, seed=request.seed)
    engine.sleep()  # free the device for Megatron until the first refit (a no-op on CPU)
    return engine
