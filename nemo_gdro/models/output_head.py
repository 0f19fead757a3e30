"""The final hidden states and the output-layer weight of a Megatron ``GPTModel``, instead of its logits.

The fused token statistics (:func:`nemo_gdro.parallel.fused_linear_stats.fused_linear_token_stats`)
apply the output layer themselves, chunk by chunk, so the model must stop
before it. ``GPTModel._postprocess`` returns the decoder's output -- which
already went through the final norm, applied inside the ``TransformerBlock``
built with ``post_process=True`` -- when the model's ``post_process`` flag is
off; :func:`final_hidden_states` switches that flag off for one forward.
:func:`output_weight` is the matrix the output layer would multiply by: the
(vocabulary-parallel) ``output_layer.weight``, or the embedding weight where
the embeddings are tied (``GPTModel.shared_embedding_or_output_weight``, the
same call Megatron makes, so a tied weight gets both gradients and the
last pipeline stage's copy stays the one Megatron synchronises).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["final_hidden_states", "output_weight", "supports_hidden_output"]


def supports_hidden_output(module: Any) -> str | None:
    """``None`` when :func:`final_hidden_states` gives the output layer's exact input, else why not.

    Multi-token prediction changes the hidden states inside ``_postprocess``;
    a sequence-parallel output layer gathers its input over TP first.
    """
    if getattr(module, "mtp_process", False) or getattr(module.config, "mtp_num_layers", None):
        return "multi-token prediction"
    if getattr(module.config, "sequence_parallel", False):
        return "sequence parallelism"
    if getattr(getattr(module, "output_layer", None), "bias", None) is not None:
        return "an output-layer bias"
    return None


@contextlib.contextmanager
def final_hidden_states(module: Any) -> Iterator[None]:
    """Inside, ``module(...)`` (a ``GPTModel`` on its last pipeline stage) returns the final
    hidden states ``[s, b, h]`` instead of the logits ``[b, s, V]``; other stages unchanged."""
    if not module.post_process:
        yield
        return
    module.post_process = False
    try:
        yield
    finally:
        module.post_process = True


def output_weight(module: Any) -> torch.Tensor:
    """``[V_local, h]``: the weight the output layer applies on this (last) stage."""
    if module.share_embeddings_and_output_weights:
        return module.shared_embedding_or_output_weight()
    return module.output_layer.weight
