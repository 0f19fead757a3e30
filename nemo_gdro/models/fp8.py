"""FP8 facts as pure functions: hardware support, GEMM alignment, token padding, TE detection.

Nothing here imports Transformer Engine (TE) or touches a GPU, so CPU-only
CI can test every rule. The rules (TE support matrix, Megatron-Core 0.16's
``fp8_utils``, TE's dimension checks):

====================  ======================================  ==================
recipe                hardware                                GEMM / token align
====================  ======================================  ==================
``delayed``           SM >= 8.9 (Ada, Hopper, Blackwell)      16
``tensorwise``        SM >= 8.9                               16
``blockwise``         SM 9.x with CUDA >= 12.9, or SM >= 10   128
``mxfp8``             SM >= 10 (Blackwell)                    32
====================  ======================================  ==================

Both dimensions of every FP8 GEMM operand must be multiples of the
alignment (the forward GEMM and the two transposed backward GEMMs
together): the weights' (per TP rank) and the token dimension of the
activations, which the actor pads (:func:`sequence_multiple`).
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Any

__all__ = [
    "FP8_RECIPES",
    "fp8_alignment",
    "fp8_hardware_error",
    "parse_cuda_version",
    "sequence_multiple",
    "padded_length",
    "fp8_gemm_shapes",
    "fp8_shape_errors",
    "te_installed",
    "te_usable_by_megatron",
    "fp8_environment",
]

FP8_RECIPES: tuple[str, ...] = ("delayed", "tensorwise", "blockwise", "mxfp8")

_ALIGNMENT = {"delayed": 16, "tensorwise": 16, "blockwise": 128, "mxfp8": 32}


def fp8_alignment(recipe: str) -> int:
    """Multiple every FP8 GEMM dimension (weights and tokens) must be for ``recipe``."""
    if recipe not in _ALIGNMENT:
        raise ValueError(f"unknown fp8 recipe {recipe!r}; valid: {', '.join(FP8_RECIPES)}")
    return _ALIGNMENT[recipe]


def parse_cuda_version(version: str | None) -> tuple[int, int] | None:
    """``torch.version.cuda`` (``"12.8"``, ``"13.0"``) -> ``(12, 8)``; ``None`` without CUDA."""
    if not version:
        return None
    parts = version.split(".")
    try:
        return int(parts[0]), int(parts[1]) if len(parts) > 1 else 0
    except ValueError:
        raise ValueError(f"cannot parse CUDA version {version!r}") from None


def fp8_hardware_error(recipe: str, sm: int, cuda_version: tuple[int, int] | None) -> str | None:
    """Why ``recipe`` cannot train on compute capability ``sm`` (``major * 10 + minor``: H100 = 90,
    B200 = 100) with CUDA ``cuda_version``; ``None`` when it can."""
    fp8_alignment(recipe)  # validates the name
    name = f"SM {sm // 10}.{sm % 10}"
    if sm < 89:
        return f"FP8 needs compute capability >= 8.9 (Ada, Hopper, Blackwell); this GPU is {name}"
    if recipe == "mxfp8" and sm < 100:
        return f"fp8_recipe=mxfp8 needs Blackwell (SM >= 10.0); this GPU is {name} (use blockwise on Hopper)"
    if recipe == "blockwise":
        if sm < 90:
            return f"fp8_recipe=blockwise needs Hopper (SM 9.0 with CUDA >= 12.9) or Blackwell; this GPU is {name}"
        if sm < 100 and (cuda_version is None or cuda_version < (12, 9)):
            got = "no CUDA" if cuda_version is None else f"CUDA {cuda_version[0]}.{cuda_version[1]}"
            return f"fp8_recipe=blockwise on Hopper needs CUDA >= 12.9 (block-scaled GEMMs); this build has {got}"
    return None


def sequence_multiple(fp8_recipe: str | None, tensor_parallel: int, sequence_parallel: bool) -> int:
    """Multiple each micro-batch's sequence length is padded to.

    FP8 GEMMs need the token dimension aligned (:func:`fp8_alignment`); with
    sequence parallelism each TP rank holds ``S / tp`` positions, so the
    multiple is scaled by ``tp``. Padding ``S`` (not ``b * S``) keeps every
    micro-batch's token count aligned whatever its row count.
    """
    multiple = fp8_alignment(fp8_recipe) if fp8_recipe is not None else 1
    return multiple * (tensor_parallel if sequence_parallel else 1)


def padded_length(length: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is >= ``length``."""
    if length < 0 or multiple < 1:
        raise ValueError(f"padded_length needs length >= 0 and multiple >= 1, got {length}, {multiple}")
    return -(-length // multiple) * multiple


def fp8_gemm_shapes(
    hidden: int, ffn: int, heads: int, groups: int, head_dim: int, tp: int
) -> dict[str, tuple[int, int]]:
    """Per-TP-rank ``[out, in]`` of the four FP8 GEMM weights of a layer (the output layer stays bf16)."""
    qkv_out = (heads + 2 * groups) * head_dim
    return {
        "linear_qkv": (qkv_out // tp, hidden),
        "linear_proj": (hidden, heads * head_dim // tp),
        "linear_fc1": (2 * ffn // tp, hidden),
        "linear_fc2": (hidden, ffn // tp),
    }


def fp8_shape_errors(shapes: dict[str, tuple[int, int]], recipe: str) -> list[str]:
    """The weights of ``shapes`` whose dimensions are not multiples of ``recipe``'s alignment."""
    align = fp8_alignment(recipe)
    return [
        f"{name} [{out}, {inp}] (needs multiples of {align})"
        for name, (out, inp) in shapes.items()
        if out % align or inp % align
    ]


def te_installed() -> bool:
    """Whether a ``transformer_engine`` package is importable (without importing it)."""
    try:
        return importlib.util.find_spec("transformer_engine") is not None
    except (ImportError, ValueError):
        return False


def te_usable_by_megatron() -> bool:
    """Whether Megatron-Core could import its TE layer spec (``gpt_layer_specs.HAVE_TE``).

    False when TE is missing or broken (a bare TE wheel without its PyTorch
    extension): Megatron then silently builds no TE modules and runs FP8
    requests in bf16.
    """
    if not te_installed():
        return False
    from megatron.core.models.gpt import gpt_layer_specs

    return bool(getattr(gpt_layer_specs, "HAVE_TE", False))


def fp8_environment(recipe: str | None, sm: int | None) -> dict[str, str]:
    """Environment TE needs for ``recipe`` on ``sm``, set before TE is imported.

    Blockwise scaling on Hopper uses fp32 scales (``NVTE_FP8_BLOCK_SCALING_FP32_SCALES=1``,
    as NeMo-RL does); Blackwell supports power-of-2 scales only and needs nothing.
    """
    if recipe == "blockwise" and sm is not None and 90 <= sm < 100:
        return {"NVTE_FP8_BLOCK_SCALING_FP32_SCALES": "1"}
    return {}


def apply_fp8_environment(env: dict[str, str], environ: Any = None) -> list[str]:
    """``setdefault`` each variable of ``env``; returns the names set too late (TE already imported)."""
    import os

    environ = os.environ if environ is None else environ
    late = []
    for key, value in env.items():
        if key not in environ and "transformer_engine" in sys.modules:
            late.append(key)
        environ.setdefault(key, value)
    return late
