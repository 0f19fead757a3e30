"""Where the policy's architecture and initial weights come from (``model.source``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from nemo_gdro.models.gpt import GPTSpec, spec_from_overrides


@dataclass(frozen=True)
class ModelInit:
    """The architecture and, when the source has them, the initial HF-layout weights."""

    spec: GPTSpec
    weights: Mapping[str, torch.Tensor] | None = None


class PresetSource:
    """Random initialisation of a :data:`~nemo_gdro.models.gpt.PRESETS` entry with ``model.overrides``.

    ``vocab_size`` defaults to the tokenizer's vocabulary padded to a multiple of 8.
    """

    @staticmethod
    def build(section: Any, tokenizer: Any) -> ModelInit:
        overrides = dict(section.overrides)
        overrides.setdefault("vocab_size", tokenizer.padded_vocab_size())
        try:
            return ModelInit(spec_from_overrides(section.preset, **overrides))
        except (ValueError, TypeError) as err:
            raise ValueError(f"model: {err}") from None
