"""The ``megatron`` config section: layer implementation, FP8, recompute, sequence parallelism, optimizer sharding.

:class:`MegatronOptions` holds the keys and rejects invalid combinations by
themselves (``fp8_param`` without ``fp8``, FP8 on the local layer spec, ...);
:func:`check_environment` adds the rules that depend on the rest of the run
and on the host (bf16 parameters, TP size, Transformer Engine installed, the
GPU's FP8 support); :func:`check_model` the ones that depend on the
architecture (layer counts per pipeline stage, FP8 GEMM shapes). Every error
is a :class:`~nemo_gdro.typed_config.ConfigError` naming the key.

Defaults are the plain behaviour: local layer spec, bf16/fp32 GEMMs, no
recompute, no sequence parallelism, a replicated optimizer, fp32 gradient
reduction. The ``*_kwargs`` methods map the section onto Megatron-Core's
``TransformerConfig``, ``DistributedDataParallelConfig`` and ``OptimizerConfig``.

Why fail fast: Megatron-Core without Transformer Engine returns a
``nullcontext`` from ``get_fp8_context``, so an FP8 request silently trains
in bf16. Here an FP8 request without TE is an error before anything is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from nemo_gdro.models import fp8 as fp8_rules
from nemo_gdro.typed_config import ConfigError

__all__ = ["MegatronOptions", "RECOMPUTE_MODULES", "HostInfo", "host_info", "check_environment", "check_model"]

#: Megatron's selective-recompute modules that do something in a dense GPT layer. Not
#: ``layernorm``: with the TE spec the norms are fused into linear_qkv / linear_fc1 (nothing to
#: recompute), and with the local spec megatron-core 0.16 needs TE for it (its
#: ``CheckpointWithoutOutput`` always takes the FP8 path: NameError without TE).
RECOMPUTE_MODULES: tuple[str, ...] = ("core_attn", "mlp")

_TE_HINT = (
    "needs NVIDIA Transformer Engine: pip install 'nemo_gdro[te]' on a GPU host (never on CPU: its bare "
    "wheel breaks `import megatron.core`)"
)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass(frozen=True)
class MegatronOptions:
    """``megatron``: how Megatron-Core builds and trains the actor.

    transformer_impl: ``local`` (Megatron's own layers; runs on CPU) or
        ``transformer_engine`` (TE layers with fused norm + linear; GPU only,
        needed for FP8 and sequence parallelism).
    fp8: ``null`` (bf16 GEMMs), ``e4m3`` (E4M3 forward and backward) or
        ``hybrid`` (E4M3 forward, E5M2 gradients); TE only, bf16 parameters.
    fp8_recipe: ``delayed`` (amax history, Megatron's default), ``tensorwise``
        (current per-tensor scaling), ``blockwise`` (1x128 / 128x128 blocks,
        DeepSeek-style; NeMo-RL's H100 choice; SM 9.0 needs CUDA >= 12.9) or
        ``mxfp8`` (Blackwell only).
    fp8_param: keep GEMM weights in FP8 (needs ``distributed_optimizer``).
    fp8_margin, fp8_amax_history_len, fp8_amax_compute_algo: delayed scaling.
    fp8_wgrad: weight gradients in FP8 (``false``: bf16 wgrad GEMMs).
    first_last_layers_bf16, num_layers_at_start_in_bf16, num_layers_at_end_in_bf16:
        keep the first / last layers of each pipeline stage in bf16 (not with ``delayed``).
    distributed_optimizer: shard Adam state and fp32 master weights over data
        parallel ranks (ZeRO-1: reduce-scatter gradients, all-gather parameters).
    grad_reduce_in_fp32: reduce gradients over DP in fp32 (``false``: in the parameter dtype).
    overlap_grad_reduce: overlap the DP gradient reduction with the backward pass.
    recompute_granularity: ``null``, ``selective`` (recompute ``recompute_modules``)
        or ``full`` (whole layers, by ``recompute_method`` / ``recompute_num_layers``).
    recompute_method: ``uniform`` (chunks of ``recompute_num_layers`` layers) or
        ``block`` (the first ``recompute_num_layers`` layers of each stage); ``full`` only.
    recompute_num_layers: see ``recompute_method``; ``full`` only.
    recompute_modules: ``selective`` only; subset of ``core_attn`` (attention
        scores and softmax) and ``mlp`` (the whole MLP) (``null``: Megatron's
        default ``[core_attn]``).
    sequence_parallel: split norms/dropout activations along the sequence over
        TP ranks (TE only, ``parallel.tensor_parallel > 1``).
    offload_optimizer_during_generation: move Adam state and fp32 master weights
        to host memory and free the gradient buffers while the rollout engine
        generates (a no-op on CPU hosts).
    fused_linear_token_stats: compute the loss pass's per-token log-prob, entropy
        and Ebar from the final hidden states and the output weight chunk by chunk
        (:mod:`nemo_gdro.parallel.fused_linear_stats`), never holding a micro-batch's
        ``[tokens, vocab]`` logits; ``false``: Megatron's output layer makes the
        logits and the chunked statistics read them. Sequence parallelism always
        takes the logits path.
    """

    transformer_impl: Literal["local", "transformer_engine"] = "local"
    fp8: Literal["e4m3", "hybrid"] | None = None
    fp8_recipe: Literal["delayed", "tensorwise", "blockwise", "mxfp8"] = "delayed"
    fp8_param: bool = False
    fp8_margin: int = 0
    fp8_amax_history_len: int = 1
    fp8_amax_compute_algo: Literal["most_recent", "max"] = "most_recent"
    fp8_wgrad: bool = True
    first_last_layers_bf16: bool = False
    num_layers_at_start_in_bf16: int = 1
    num_layers_at_end_in_bf16: int = 1
    distributed_optimizer: bool = False
    grad_reduce_in_fp32: bool = True
    overlap_grad_reduce: bool = False
    recompute_granularity: Literal["selective", "full"] | None = None
    recompute_method: Literal["uniform", "block"] | None = None
    recompute_num_layers: int | None = None
    recompute_modules: tuple[str, ...] | None = None
    sequence_parallel: bool = False
    offload_optimizer_during_generation: bool = False
    fused_linear_token_stats: bool = True

    def __post_init__(self) -> None:
        te = self.transformer_impl == "transformer_engine"
        if self.fp8 is not None:
            _require(
                te,
                f"megatron.fp8={self.fp8} needs megatron.transformer_impl=transformer_engine (the local layer "
                "spec has no FP8 GEMMs; Megatron would silently train in bf16)",
            )
        else:
            for key in ("fp8_param", "first_last_layers_bf16"):
                _require(not getattr(self, key), f"megatron.{key}=true needs megatron.fp8 (e4m3 or hybrid)")
        _require(
            not (self.fp8_param and not self.distributed_optimizer),
            "megatron.fp8_param=true needs megatron.distributed_optimizer=true (FP8 parameters are gathered by "
            "the distributed optimizer)",
        )
        _require(
            not (self.first_last_layers_bf16 and self.fp8_recipe == "delayed"),
            "megatron.first_last_layers_bf16=true does not work with megatron.fp8_recipe=delayed "
            "(use tensorwise, blockwise or mxfp8)",
        )
        _require(self.fp8_margin >= 0, f"megatron.fp8_margin must be >= 0, got {self.fp8_margin}")
        _require(
            self.fp8_amax_history_len >= 1,
            f"megatron.fp8_amax_history_len must be >= 1, got {self.fp8_amax_history_len}",
        )
        for key in ("num_layers_at_start_in_bf16", "num_layers_at_end_in_bf16"):
            _require(getattr(self, key) >= 0, f"megatron.{key} must be >= 0, got {getattr(self, key)}")
        self._check_recompute()
        _require(
            not self.sequence_parallel or te,
            "megatron.sequence_parallel=true needs megatron.transformer_impl=transformer_engine",
        )

    def _check_recompute(self) -> None:
        granularity = self.recompute_granularity
        if granularity is None:
            for key in ("recompute_method", "recompute_num_layers", "recompute_modules"):
                _require(
                    getattr(self, key) is None,
                    f"megatron.{key} applies only with megatron.recompute_granularity (selective or full)",
                )
        elif granularity == "full":
            _require(
                self.recompute_method is not None,
                "megatron.recompute_granularity=full needs megatron.recompute_method (uniform or block)",
            )
            _require(
                self.recompute_num_layers is not None and self.recompute_num_layers >= 1,
                f"megatron.recompute_granularity=full needs megatron.recompute_num_layers >= 1, got "
                f"{self.recompute_num_layers}",
            )
            _require(
                self.recompute_modules is None,
                "megatron.recompute_modules applies to recompute_granularity=selective only",
            )
        else:
            for key in ("recompute_method", "recompute_num_layers"):
                _require(
                    getattr(self, key) is None,
                    f"megatron.{key} applies to recompute_granularity=full only (selective recomputes "
                    "megatron.recompute_modules in every layer)",
                )
            if self.recompute_modules is not None:
                bad = sorted(set(self.recompute_modules) - set(RECOMPUTE_MODULES))
                _require(
                    not bad and len(self.recompute_modules) > 0,
                    f"megatron.recompute_modules must be a non-empty subset of {list(RECOMPUTE_MODULES)}, got "
                    f"{list(self.recompute_modules)}",
                )

    # ------------------------------------------------------------------ Megatron configs
    @property
    def uses_te(self) -> bool:
        return self.transformer_impl == "transformer_engine"

    def sequence_multiple(self, tensor_parallel: int) -> int:
        """Micro-batch sequence lengths are padded to a multiple of this (FP8 GEMMs, sequence parallelism)."""
        return fp8_rules.sequence_multiple(
            self.fp8_recipe if self.fp8 else None, tensor_parallel, self.sequence_parallel
        )

    def transformer_config_kwargs(self) -> dict[str, Any]:
        """``TransformerConfig`` fields set by this section (nothing for the defaults)."""
        kwargs: dict[str, Any] = {}
        if self.fp8 is not None:
            kwargs.update(
                fp8=self.fp8,
                fp8_recipe=self.fp8_recipe,
                fp8_param=self.fp8_param,
                fp8_margin=self.fp8_margin,
                fp8_amax_history_len=self.fp8_amax_history_len,
                fp8_amax_compute_algo=self.fp8_amax_compute_algo,
                fp8_wgrad=self.fp8_wgrad,
                first_last_layers_bf16=self.first_last_layers_bf16,
                num_layers_at_start_in_bf16=self.num_layers_at_start_in_bf16,
                num_layers_at_end_in_bf16=self.num_layers_at_end_in_bf16,
            )
        if self.recompute_granularity is not None:
            kwargs.update(
                recompute_granularity=self.recompute_granularity,
                recompute_method=self.recompute_method,
                recompute_num_layers=self.recompute_num_layers,
            )
            if self.recompute_modules is not None:
                kwargs["recompute_modules"] = list(self.recompute_modules)
        if self.sequence_parallel:
            kwargs["sequence_parallel"] = True
        return kwargs

    def ddp_config_kwargs(self) -> dict[str, Any]:
        """``DistributedDataParallelConfig`` fields."""
        return {
            "grad_reduce_in_fp32": self.grad_reduce_in_fp32,
            "overlap_grad_reduce": self.overlap_grad_reduce,
            # Parameters are all-gathered inside the optimizer step, so exported weights are never stale.
            "overlap_param_gather": False,
            "use_distributed_optimizer": self.distributed_optimizer,
        }

    def optimizer_config_kwargs(self) -> dict[str, Any]:
        """``OptimizerConfig`` fields."""
        return {
            "use_distributed_optimizer": self.distributed_optimizer,
            "fp8_recipe": self.fp8_recipe if self.fp8 is not None else None,
        }


# ---------------------------------------------------------------------------- host and run checks
@dataclass(frozen=True)
class HostInfo:
    """What the checks need to know about the host.

    te_installed: a ``transformer_engine`` package can be imported.
    te_usable: Megatron-Core imported its TE layer spec (``None``: not checked yet,
        Megatron is imported only when the model is built).
    sm: CUDA compute capability ``major * 10 + minor`` (``None`` without a GPU).
    cuda_version: ``torch.version.cuda`` as ``(major, minor)`` (``None`` for CPU builds).
    """

    te_installed: bool
    te_usable: bool | None = None
    sm: int | None = None
    cuda_version: tuple[int, int] | None = None


def host_info(*, check_megatron: bool = False) -> HostInfo:
    """This process's :class:`HostInfo` (``check_megatron`` imports Megatron's layer specs to read ``HAVE_TE``)."""
    import torch

    sm = None
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        sm = major * 10 + minor
    installed = fp8_rules.te_installed()
    usable = fp8_rules.te_usable_by_megatron() if (check_megatron and installed) else None
    return HostInfo(installed, usable, sm, fp8_rules.parse_cuda_version(torch.version.cuda))


def check_environment(
    options: MegatronOptions, *, params_dtype: str, tensor_parallel: int, host: HostInfo | None = None
) -> None:
    """Rules that involve other sections (``model.dtype``, ``parallel.tensor_parallel``) and the host.

    ``params_dtype`` is ``model.dtype`` (``float32`` / ``bfloat16``). The
    hardware rules apply only where a GPU is visible (``host.sm``); the TE
    rules always. ``host=None``: :func:`host_info`, asked only when TE or FP8
    is requested (it imports torch; a plain config is checked without it).
    """
    if host is None and (options.uses_te or options.fp8 is not None):
        host = host_info()
    if options.fp8 is not None:
        _require(
            params_dtype == "bfloat16",
            f"megatron.fp8={options.fp8} needs model.dtype=bfloat16 (FP8 GEMMs with bf16 parameters and fp32 "
            f"master weights), got model.dtype={params_dtype}",
        )
    if options.sequence_parallel:
        _require(
            tensor_parallel > 1,
            "megatron.sequence_parallel=true needs parallel.tensor_parallel > 1 (it splits activations over TP ranks)",
        )
    if options.uses_te:
        what = f"megatron.fp8={options.fp8}" if options.fp8 else "megatron.transformer_impl=transformer_engine"
        _require(host.te_installed, f"{what} {_TE_HINT}")
        _require(
            host.te_usable is not False,
            f"{what}: transformer_engine is installed but Megatron-Core cannot use it (megatron.core.models.gpt."
            "gpt_layer_specs.HAVE_TE is False: TE's PyTorch extension is missing or broken); FP8 would silently "
            "run in bf16. Install transformer-engine[pytorch] matching this torch and CUDA",
        )
    if options.fp8 is not None and host.sm is not None:
        error = fp8_rules.fp8_hardware_error(options.fp8_recipe, host.sm, host.cuda_version)
        _require(error is None, f"megatron.fp8_recipe={options.fp8_recipe}: {error}")


def check_model(options: MegatronOptions, spec: Any, *, tensor_parallel: int, pipeline_parallel: int) -> None:
    """Rules that involve the architecture (a :class:`~nemo_gdro.models.gpt.GPTSpec`)."""
    per_stage = spec.num_layers // pipeline_parallel
    if options.recompute_granularity == "full":
        _require(
            options.recompute_num_layers <= per_stage,  # type: ignore[operator]
            f"megatron.recompute_num_layers={options.recompute_num_layers} exceeds the {per_stage} layers per "
            f"pipeline stage (model.num_layers={spec.num_layers}, parallel.pipeline_parallel={pipeline_parallel})",
        )
    if options.fp8 is None:
        return
    if options.first_last_layers_bf16:
        for key in ("num_layers_at_start_in_bf16", "num_layers_at_end_in_bf16"):
            _require(
                getattr(options, key) <= per_stage,
                f"megatron.{key}={getattr(options, key)} exceeds the {per_stage} layers per pipeline stage",
            )
    shapes = fp8_rules.fp8_gemm_shapes(
        spec.hidden_size, spec.ffn_hidden_size, spec.num_attention_heads, spec.num_query_groups,
        spec.kv_channels, tensor_parallel,
    )
    bad = fp8_rules.fp8_shape_errors(shapes, options.fp8_recipe)
    _require(
        not bad,
        f"megatron.fp8_recipe={options.fp8_recipe}: FP8 GEMM weights per TP rank (parallel.tensor_parallel="
        f"{tensor_parallel}) are not aligned: {'; '.join(bad)}; change the model shape or the recipe",
    )
