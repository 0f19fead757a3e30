"""Where the policy's architecture and initial weights come from (``model.source``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nemo_gdro.models.gpt import GPTSpec, spec_from_overrides


@dataclass(frozen=True)
class ModelInit:
    """The architecture and, when the source has them, where the initial weights are.

    weights_dir: an HF checkpoint directory loaded into the actor after it is
        built (each rank reads its own shard), or ``None`` for random init.
    """

    spec: GPTSpec
    weights_dir: Path | None = None

    def initialize(self, actor: Any) -> None:
        """Load the source's weights into ``actor`` (a no-op for random initialisation)."""
        if self.weights_dir is not None:
            actor.load_hf_weights(self.weights_dir)


def check_vocab(spec: GPTSpec, tokenizer: Any, where: str) -> None:
    """The embedding must cover every token id the tokenizer can produce (padding rows are fine)."""
    if spec.vocab_size < tokenizer.vocab_size:
        raise ValueError(
            f"{where}: the model's vocabulary ({spec.vocab_size}) is smaller than the tokenizer's "
            f"({tokenizer.vocab_size} ids): token ids past the embedding would crash or be garbage"
        )


class PresetSource:
    """Random initialisation of a :data:`~nemo_gdro.models.gpt.PRESETS` entry with ``model.overrides``.

    ``vocab_size`` defaults to the tokenizer's vocabulary padded to a multiple of 8.
    """

    @staticmethod
    def build(section: Any, tokenizer: Any) -> ModelInit:
        overrides = dict(section.overrides)
        overrides.setdefault("vocab_size", tokenizer.padded_vocab_size())
        try:
            spec = spec_from_overrides(section.preset, **overrides)
        except (ValueError, TypeError) as err:
            raise ValueError(f"model: {err}") from None
        check_vocab(spec, tokenizer, "model.overrides.vocab_size")
        return ModelInit(spec)


class HFSource:
    """A Hugging Face checkpoint directory: ``config.json`` gives the architecture, safetensors the weights."""

    @staticmethod
    def build(section: Any, tokenizer: Any) -> ModelInit:
        from nemo_gdro.models.hf_export_marker import is_assets_dir
        from nemo_gdro.models.hf_preflight import check_hf_checkpoint

        path = Path(section.path)
        # A checkpoint's copy of the model's files (export / eval once the folder is gone) has no
        # weights: the checkpoint's actor state replaces the initial weights.
        weights = not is_assets_dir(path)
        # config.json, the index and every shard's header (names, shapes, dtypes, sizes): milliseconds.
        spec = check_hf_checkpoint(path, weights=weights)
        check_vocab(spec, tokenizer, f"model.path={path}")
        return ModelInit(spec, weights_dir=path if weights else None)
