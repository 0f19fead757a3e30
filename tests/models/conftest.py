"""Tiny real HF checkpoints (built once per session) and the Megatron world of one process."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    """name -> directory: ``save_pretrained`` checkpoints (>= 2 shards for qwen3) + the real Qwen3 tokenizer.

    ``qwen3``: tied (as Qwen3-0.6B); ``qwen3_untied`` (as Qwen3-8B); ``qwen2``:
    qkv bias, untied; ``llama``: untied, no tokenizer files.
    """
    pytest.importorskip("transformers")
    from nemo_gdro.testing.tiny_hf import build_tiny_hf

    root = tmp_path_factory.mktemp("tiny_hf")
    return {
        "qwen3": build_tiny_hf(root / "qwen3", arch="qwen3", seed=1),
        "qwen3_untied": build_tiny_hf(root / "qwen3_untied", arch="qwen3", tie_word_embeddings=False, seed=2),
        "qwen2": build_tiny_hf(root / "qwen2", arch="qwen2", seed=3),
        "llama": build_tiny_hf(root / "llama", arch="llama", seed=4, tokenizer=False),
    }


@pytest.fixture(scope="module")
def dist_env():
    """A single-process Megatron world (TP = PP = 1) for the module's tests."""
    pytest.importorskip("megatron.core")
    from nemo_gdro.parallel.distributed import destroy_distributed, init_distributed

    info = init_distributed(seed=0)
    yield info
    destroy_distributed()
