"""``rollout.vllm.*``: the vLLM engine's options, and whether vLLM is installed.

No torch and no vLLM import: the run config checks these before anything heavy
is imported. The engine is :mod:`nemo_gdro.rollout.vllm_engine`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["VLLMOptions", "vllm_available"]


def vllm_available() -> bool:
    """True when ``vllm`` is importable (``pip install 'nemo_gdro[vllm]'``; on CPU: ``make setup-vllm``)."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


@dataclass(frozen=True)
class VLLMOptions:
    """Engine options (``rollout.vllm.*``).

    tensor_parallel: vLLM TP size (independent of Megatron's TP); divides the world size.
    dtype: ``"float32"`` (CPU tests), ``"bfloat16"``, ``"float16"`` or ``"auto"``.
    gpu_memory_utilization: fraction of device memory vLLM may take (GPU; checked
        against the memory free when the engine is built).
    kv_cache_memory_bytes: KV-cache size in bytes; overrides the utilisation rule
        (use it on CPU, e.g. ``64 << 20``).
    max_model_len: longest prompt + response in tokens; None = the model's
        ``max_position_embeddings``.
    max_num_seqs: most sequences vLLM runs at once.
    enforce_eager: no CUDA graphs / compilation.
    enable_prefix_caching: reuse KV of shared prompt prefixes (the ``n`` children
        of a prompt share it); reset after every refit.
    sleep_level: 0 never sleep; 1 offload weights to host memory and drop the KV
        cache; 2 drop both (needs a refit before the next generation). GPU only.
    quantization: vLLM quantisation method for generation (e.g. ``"fp8"``), or None.
    check_tp_inputs: verify each ``generate`` call's inputs are identical across
        the vLLM TP group (only when ``tensor_parallel > 1``).
    """

    tensor_parallel: int = 1
    dtype: str = "float32"
    gpu_memory_utilization: float = 0.5
    kv_cache_memory_bytes: int | None = None
    max_model_len: int | None = None
    max_num_seqs: int = 256
    enforce_eager: bool = True
    enable_prefix_caching: bool = True
    sleep_level: Literal[0, 1, 2] = 1
    quantization: str | None = None
    check_tp_inputs: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.tensor_parallel, int) or self.tensor_parallel < 1:
            raise ValueError(f"rollout.vllm.tensor_parallel must be an int >= 1, got {self.tensor_parallel!r}")
        if self.dtype not in ("float32", "bfloat16", "float16", "auto"):
            raise ValueError(f"rollout.vllm.dtype must be float32, bfloat16, float16 or auto, got {self.dtype!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(
                f"rollout.vllm.gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes <= 0:
            raise ValueError(f"rollout.vllm.kv_cache_memory_bytes must be > 0, got {self.kv_cache_memory_bytes}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"rollout.vllm.max_model_len must be >= 2, got {self.max_model_len}")
        if self.max_num_seqs < 1:
            raise ValueError(f"rollout.vllm.max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.sleep_level not in (0, 1, 2):
            raise ValueError(f"rollout.vllm.sleep_level must be 0, 1 or 2, got {self.sleep_level!r}")
