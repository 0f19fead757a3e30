"""The policy actor: a Megatron-Core GPT trained with Megatron's forward/backward schedules.

Batch layout
------------
``tokens`` is an int64 ``[B, S]`` tensor of right-padded full sequences
(prompt + response + padding), causal attention, position ids ``0..S-1``.
Per-token tensors are aligned with the prediction targets and have shape
``[B, S-1]``: position ``t`` holds the statistics of ``tokens[:, t+1]`` under
the model's distribution at position ``t``. Masks (which targets are response
tokens) are the caller's business and travel in ``extras``.

Loss scaling
------------
The caller's ``loss_fn`` already normalises by the GLOBAL token count (all
micro-batches of all data-parallel ranks), so the gradient we want is that of
the plain SUM of the per-micro-batch losses, summed over DP ranks. Megatron by
default divides each micro-batch loss by the number of micro-batches and
averages gradients over DP ranks. Setting
``TransformerConfig.calculate_per_token_loss=True`` switches both off (no
division in ``forward_step_calc_loss``, gradient scaling factor 1 in DDP);
megatron would then divide by the token count it accumulated from the
``loss_func`` outputs inside ``finalize_model_grads``, so our finalize
function passes ``num_tokens=None`` to keep the gradient scale at exactly 1.
The gradient is therefore independent of the micro-batch size.

Parallel layouts (TP x PP x DP)
-------------------------------
Every rank of the job calls every method collectively.

* Data parallel: each DP rank passes ITS OWN rows (its slice of the
  mini-batch; slices disjoint, together the whole mini-batch); the ranks of
  one TP x PP model replica pass the same rows. ``loss_fn`` must normalise
  by counts taken over the whole mini-batch (all-reduce them over
  :attr:`MegatronActor.dp_group` first), and statistics that define the loss
  (DynaMO's ``ModulationStats``, R²VPO's centre) must likewise be reduced
  over DP before the step. DDP then sums the gradients (scale 1), so the
  update equals that of one rank holding all rows.
* Tensor parallel: the output layer is vocabulary-parallel; the token
  statistics reduce per-token scalars over the TP group and never gather the
  vocabulary (see "Token statistics" below).
* Pipeline parallel: Megatron's 1F1B schedule with ``[S, b, h]`` activations
  (every micro-batch must have the same ``b``); logits, token statistics
  and the loss exist on the last stage only. :meth:`MegatronActor.compute_token_stats`
  and the dicts returned by :meth:`MegatronActor.forward_backward` /
  :meth:`MegatronActor.train_step` are broadcast from the last stage, so
  every rank gets them; a ``loss_fn`` object's own side effects (e.g. its
  accumulators) happen on the last stage only: report what other ranks
  need through its metrics.

Token statistics (the loss pass)
--------------------------------
At every TP size (TP = 1 included) the per-token ``logp``, ``entropy`` and
``ebar`` come from the chunked kernels of :mod:`nemo_gdro.parallel.vocab_parallel`
(the full-vocabulary reference :func:`nemo_gdro.algorithms.token_stats.full_vocab_token_stats`
is their test oracle). With ``megatron.fused_linear_token_stats`` (default)
the model stops at its final hidden states (:mod:`nemo_gdro.models.output_head`)
and :func:`nemo_gdro.parallel.fused_linear_stats.fused_linear_token_stats`
applies the output weight chunk by chunk, forward and backward, so a
micro-batch's ``[tokens, vocab]`` logits never exist; otherwise (or with
sequence parallelism, or a caller's ``token_stats_fn``) Megatron's output
layer makes the logits and the statistics read them, and a micro-batch whose
logits would not fit in memory is refused before the pass
(:mod:`nemo_gdro.trainer.loss_memory`). ``ebar`` is computed only when the
actor is built with ``ebar=True`` (a stage needs it).

GPU paths (``megatron`` section, :class:`~nemo_gdro.models.megatron_options.MegatronOptions`)
--------------------------------------------------------------------------------------
* Transformer Engine layers and FP8 GEMMs; each micro-batch's sequence
  length is padded to the multiple FP8 (16 / 32 / 128 tokens) and sequence
  parallelism (x TP) need. Padding is appended after every row, so under
  causal attention it changes no real position; logits of the padding are
  dropped before the token statistics, and ``loss_fn`` sees ``[b, S-1]`` as
  always.
* Megatron's distributed optimizer (Adam state and fp32 master weights
  sharded over DP); :meth:`MegatronActor.state_dict` gathers the state on
  DP rank 0 and :meth:`MegatronActor.load_state_dict` scatters it from there,
  so checkpoints keep the layout they have with the plain optimizer.
* Activation recompute (selective / full), passed to ``TransformerConfig``.
* :meth:`MegatronActor.offloaded_for_generation`: Adam state and master
  weights in host memory and gradient buffers freed while the rollout engine
  generates (GPU only).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.distributed as dist

from nemo_gdro.models.fp8 import padded_length
from nemo_gdro.models.gpt import GPTSpec, build_gpt
from nemo_gdro.models.hf_mapping import export_to_hf, import_from_hf
from nemo_gdro.models.megatron_options import MegatronOptions, check_environment, check_model, host_info
from nemo_gdro.models.output_head import final_hidden_states, output_weight, supports_hidden_output
from nemo_gdro.parallel import comm
from nemo_gdro.parallel.distributed import preserved_rng_state, seed_everything
from nemo_gdro.parallel.fused_linear_stats import fused_linear_token_stats
from nemo_gdro.parallel.vocab_parallel import make_token_stats_fn
from nemo_gdro.trainer.errors import RunError
from nemo_gdro.trainer.loss_memory import loss_pass_problem
from nemo_gdro.trainer.microbatch import (
    MicroBatch,
    pipeline_micro_batch_size,
    plan_fixed,
    plan_token_budget,
)

__all__ = ["LossFn", "MegatronActor", "OptimConfig", "StepReport", "TokenStatsFn"]

#: ``loss_fn(stats, extras_mb) -> (loss, metrics)`` or ``(loss, metrics, row_outputs)``:
#: ``stats`` holds ``logp``, ``entropy`` (with grad) and ``ebar`` (detached), each
#: ``[b, S-1]``; ``extras_mb`` the row slices of ``extras``; ``loss`` a 0-dim tensor
#: already normalised by the global token count; ``metrics`` scalars that are summed
#: over micro-batches and DP ranks; ``row_outputs`` detached ``[b]`` tensors, one value
#: per row of the micro-batch, returned for this rank's rows in row order.
LossFn = Callable[[dict[str, torch.Tensor], dict[str, torch.Tensor]], tuple[Any, ...]]

#: Reserved prefix of row outputs inside the schedule's per-micro-batch reports.
ROW_PREFIX = "row/"


class StepReport(dict):
    """What a training pass returns: ``{metric: float}`` (summed over micro-batches and DP
    ranks, identical on every rank) plus ``rows``, the loss's per-row outputs ``name ->
    float64 [B]`` for this rank's ``B`` rows (empty when the loss returns none)."""

    rows: dict[str, torch.Tensor]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rows = {}

#: ``(logits [..., V_local], targets [...], temperature) -> (logp, entropy, ebar)``, each
#: ``[...]`` fp32 nats, over this rank's vocabulary shard of the logits (the default is
#: :func:`nemo_gdro.parallel.vocab_parallel.make_token_stats_fn` at every TP size).
TokenStatsFn = Callable[[torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warm-up and global-norm gradient clipping.

    Attributes:
        lr: peak learning rate.
        weight_decay: decoupled weight decay (not applied to biases and 1-D
            parameters such as norms, Megatron's standard grouping).
        betas: Adam ``(beta1, beta2)``.
        eps: Adam epsilon.
        grad_clip: max global L2 norm of the gradient; ``0`` disables clipping.
        warmup_steps: optimizer step ``k`` (0-based) uses ``lr * min(1, (k+1) / warmup_steps)``.
        micro_batch_size: rows per forward/backward pass (fixed-size plan).
        max_tokens_per_microbatch: token budget per forward/backward pass
            (rows x longest row, padding counted); when set and the caller
            passes row lengths, rows are packed by length under it instead
            (:mod:`~nemo_gdro.trainer.microbatch`).
    """

    lr: float = 1e-6
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 1.0
    warmup_steps: int = 0
    micro_batch_size: int = 4
    max_tokens_per_microbatch: int | None = None

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas must be two values in [0, 1), got {self.betas}")
        if not self.eps > 0:
            raise ValueError(f"optim.eps must be > 0, got {self.eps}")
        if self.grad_clip < 0:
            raise ValueError(f"optim.grad_clip must be >= 0, got {self.grad_clip}")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.micro_batch_size < 1:
            raise ValueError(f"optim.micro_batch_size must be >= 1, got {self.micro_batch_size}")
        if self.max_tokens_per_microbatch is not None and self.max_tokens_per_microbatch < 2:
            raise ValueError(
                f"trainer.max_tokens_per_microbatch must be >= 2 or null, got {self.max_tokens_per_microbatch}"
            )

    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step ``step`` (0-based)."""
        if self.warmup_steps == 0:
            return self.lr
        return self.lr * min(1.0, (step + 1) / self.warmup_steps)


def _finalize_grads_globally_normalised(model: list[torch.nn.Module], num_tokens: Any = None, **kwargs: Any) -> None:
    """Megatron's ``finalize_model_grads`` without the division by the token count.

    Performs the DP gradient all-reduce (and the PP embedding / SP norm
    reductions). ``num_tokens`` is dropped on purpose: see the module doc.
    """
    from megatron.core.distributed import finalize_model_grads

    finalize_model_grads(model, None, **kwargs)


@contextlib.contextmanager
def _step_state_set_aside(inner: torch.optim.Optimizer) -> Iterator[None]:
    """Hide torch Adam's per-parameter ``step`` while Megatron's distributed optimizer loads its state.

    Without TE / Apex the inner optimizer is torch's Adam, which keeps ``step``
    per parameter; ``load_parameter_state_from_dp_zero`` copies every key of
    that state from the checkpoint's ``param`` / ``exp_avg`` / ``exp_avg_sq``
    and raises ``KeyError: 'step'``. The step itself is restored from the
    param groups by ``load_state_dict`` before, as ONE tensor shared by every
    parameter, which torch's Adam would then increment once per parameter and
    step: each parameter gets its own copy back here.
    """
    steps = {id(st): st.pop("step") for st in inner.state.values() if "step" in st}
    try:
        yield
    finally:
        for st in inner.state.values():
            if id(st) in steps:
                st["step"] = steps[id(st)].detach().clone()


def _finite(tensors: list[torch.Tensor]) -> bool:
    """All elements of all ``tensors`` finite (one host sync)."""
    if not tensors:
        return True
    return bool(torch.stack([torch.isfinite(t.detach()).all() for t in tensors]).all())


def _all_ranks(ok: bool) -> bool:
    """``ok`` AND-ed over every process of the job (a MIN all-reduce; no-op in one process)."""
    flag = torch.tensor([1.0 if ok else 0.0], dtype=torch.float64)
    return bool(comm.all_reduce(flag, op=dist.ReduceOp.MIN)[0] > 0)


class MegatronActor:
    """A Megatron GPT policy: token statistics, training steps, HF export, checkpoints.

    Megatron's parallel state must be initialised
    (:func:`nemo_gdro.parallel.distributed.init_distributed`). Every rank of
    the job constructs the actor and calls its methods collectively.

    Args:
        spec: model architecture.
        optim: optimizer settings.
        seed: initialisation seed: two actors built with the same seed start
            identical; the process's RNG streams are restored afterwards.
        temperature: sampling temperature applied to logits before all statistics.
        params_dtype: parameter dtype (fp32 on CPU, bf16 on GPU).
        token_stats_fn: logits -> per-token statistics (see :data:`TokenStatsFn`);
            default: the fused hidden-state path (``megatron.fused_linear_token_stats``)
            or the chunked vocabulary-parallel one over the TP group, at every TP size.
            A caller's function always reads the logits.
        ebar: compute DynaMO's ``ebar`` in every pass (``False``: the stats dicts
            have ``logp`` and ``entropy`` only; set it from the stages' ``needs_ebar``).
        megatron: layer implementation, FP8, recompute, sequence parallelism,
            distributed optimizer, offloading (default: local spec, none of them).
            Invalid for this host or model -> ``ConfigError`` naming the key.
        sequence_multiple: pad each micro-batch's sequence length to a multiple
            of this (default: what ``megatron`` needs, 1 without FP8 / sequence
            parallelism).
    """

    def __init__(
        self,
        spec: GPTSpec,
        optim: OptimConfig,
        *,
        seed: int,
        temperature: float = 1.0,
        params_dtype: torch.dtype = torch.float32,
        token_stats_fn: TokenStatsFn | None = None,
        megatron: MegatronOptions | None = None,
        sequence_multiple: int | None = None,
        ebar: bool = True,
    ) -> None:
        from megatron.core import parallel_state
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
        )

        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.spec = spec
        self.optim = optim
        self.temperature = float(temperature)
        tp_size = parallel_state.get_tensor_model_parallel_world_size()
        if spec.vocab_size % tp_size != 0:
            raise ValueError(f"model.vocab_size ({spec.vocab_size}) must be divisible by tensor_parallel ({tp_size})")
        if spec.num_query_groups % tp_size != 0:
            raise ValueError(
                f"model.num_query_groups ({spec.num_query_groups}) must be divisible by tensor_parallel ({tp_size})"
            )
        self.ebar = bool(ebar)
        self._custom_stats = token_stats_fn is not None
        # Each TP rank holds a vocabulary slice of the output layer; with TP = 1 the group is
        # skipped and the chunked kernels run without communication.
        self._tp_size = tp_size
        self._tp_group = parallel_state.get_tensor_model_parallel_group() if tp_size > 1 else None
        self._tp_rank = parallel_state.get_tensor_model_parallel_rank()
        self.token_stats_fn = token_stats_fn if token_stats_fn is not None else make_token_stats_fn(ebar=self.ebar)
        self._pp_size = parallel_state.get_pipeline_model_parallel_world_size()
        if spec.num_layers % self._pp_size != 0:
            raise ValueError(
                f"model.num_layers ({spec.num_layers}) must be divisible by pipeline_parallel ({self._pp_size})"
            )
        self._is_last_stage = parallel_state.is_pipeline_last_stage()
        self._pp_group = parallel_state.get_pipeline_model_parallel_group()
        # Global rank of the last stage of this rank's pipeline: the source of every broadcast.
        self._last_stage_rank = parallel_state.get_pipeline_model_parallel_last_rank()
        self._dp_group = parallel_state.get_data_parallel_group()
        self.megatron = megatron = megatron if megatron is not None else MegatronOptions()
        dtype_name = {torch.float32: "float32", torch.bfloat16: "bfloat16"}.get(params_dtype, str(params_dtype))
        # Before anything is built: FP8 without a usable TE must not silently train in bf16.
        check_environment(
            megatron, params_dtype=dtype_name, tensor_parallel=tp_size, host=host_info(check_megatron=megatron.uses_te)
        )
        check_model(megatron, spec, tensor_parallel=tp_size, pipeline_parallel=self._pp_size)
        if sequence_multiple is not None and sequence_multiple < 1:
            raise ValueError(f"sequence_multiple must be >= 1, got {sequence_multiple}")
        #: Micro-batch sequence lengths are padded to a multiple of this.
        self.sequence_multiple = sequence_multiple or megatron.sequence_multiple(tp_size)
        self._offloaded: list[tuple[Any, Any, torch.device]] | None = None

        # The initial weights depend on ``seed`` only; the caller's RNG streams are left as they were.
        with preserved_rng_state():
            seed_everything(seed)
            module = build_gpt(
                spec,
                params_dtype=params_dtype,
                pre_process=parallel_state.is_pipeline_first_stage(),
                post_process=parallel_state.is_pipeline_last_stage(),
                config_overrides={"calculate_per_token_loss": True, **megatron.transformer_config_kwargs()},
                transformer_impl=megatron.transformer_impl,
            )
        config = module.config
        # Megatron DDP works on CPU with the compat shim (its buffers are placed via
        # torch.cuda.current_device()); fp32 main grads even for bf16 parameters.
        self.model = DistributedDataParallel(
            config=config, ddp_config=DistributedDataParallelConfig(**megatron.ddp_config_kwargs()), module=module
        )
        # Without a finalize function the schedules never trigger the DP all-reduce.
        config.finalize_model_grads_func = _finalize_grads_globally_normalised
        config.no_sync_func = self.model.no_sync
        self._params_dtype = params_dtype
        #: Why the loss pass reads Megatron's logits instead of the fused hidden-state path (``None``: fused).
        self.logits_path_reason: str | None
        if self._custom_stats:
            self.logits_path_reason = "a caller's token_stats_fn"
        elif not megatron.fused_linear_token_stats:
            self.logits_path_reason = "megatron.fused_linear_token_stats=false"
        else:
            self.logits_path_reason = supports_hidden_output(module)
        self.optimizer = self._build_optimizer(optim)
        self.step_count = 0  # optimizer steps taken (drives the LR schedule)

    def _build_optimizer(self, optim: OptimConfig):  # -> megatron.core.optimizer.MegatronOptimizer
        """Megatron's optimizer for ``optim`` over the DDP model (fresh Adam state).

        Megatron's optimizer runs on CPU with the shim (its clip-by-norm is patched
        there), so the same code path serves CPU and GPU: AdamW over the DDP main
        grads (fp32 master weights for bf16), global-norm clipping across
        model-parallel ranks, and Megatron's parameter grouping (no weight decay
        on biases / 1-D tensors).
        """
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        params_dtype = self._params_dtype
        optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam",
                lr=optim.lr,
                min_lr=optim.lr,
                weight_decay=optim.weight_decay,
                adam_beta1=optim.betas[0],
                adam_beta2=optim.betas[1],
                adam_eps=optim.eps,
                # clip_grad=inf still computes (and returns) the norm but never scales.
                clip_grad=optim.grad_clip if optim.grad_clip > 0 else math.inf,
                bf16=params_dtype == torch.bfloat16,
                params_dtype=params_dtype,
                **self.megatron.optimizer_config_kwargs(),
            ),
            [self.model],
        )
        self.model.config.grad_scale_func = optimizer.scale_loss
        return optimizer

    def reset_optimizer(self, optim: OptimConfig) -> None:
        """Switch to new optimizer settings with fresh Adam state and LR schedule (weights kept).

        For example from the SFT warm start to the RL phase.
        """
        self.model.zero_grad_buffer()
        self.optim = optim
        self.optimizer = self._build_optimizer(optim)
        self.step_count = 0

    # ------------------------------------------------------------------ helpers
    @property
    def fused_token_stats(self) -> bool:
        """The loss pass never materialises the logits (module doc, "Token statistics")."""
        return self.logits_path_reason is None

    @property
    def module(self) -> torch.nn.Module:
        """The bare ``GPTModel`` (no DDP wrapper)."""
        return self.model.module

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @property
    def dp_group(self) -> Any:
        """The data-parallel process group (reduce global counts and loss statistics over it)."""
        return self._dp_group

    def _broadcast_from_last_stage(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` as the last pipeline stage holds it, on every stage (identity without PP)."""
        if self._pp_size > 1:
            return comm.broadcast(tensor, src=self._last_stage_rank, group=self._pp_group)
        return tensor

    def _plan(
        self, tokens: torch.Tensor, extras: Mapping[str, torch.Tensor], micro_batch_size: int | None,
        lengths: torch.Tensor | None,
    ) -> list[MicroBatch]:
        if tokens.dim() != 2 or tokens.dtype != torch.int64:
            raise ValueError(f"tokens must be int64 [B, S], got {tokens.dtype} {tuple(tokens.shape)}")
        b, s = tokens.shape
        if s < 2:
            raise ValueError(f"sequences need at least 2 tokens, got S={s}")
        if s > self.spec.max_position_embeddings:
            raise ValueError(
                f"sequence length {s} exceeds model.max_position_embeddings={self.spec.max_position_embeddings}"
            )
        for key, value in extras.items():
            if value.shape[0] != b:
                raise ValueError(f"extras[{key!r}] has {value.shape[0]} rows, tokens has {b}")
        if lengths is not None and (lengths.shape != (b,) or int(lengths.max()) > s):
            raise ValueError(f"lengths must be [B={b}] row lengths <= S={s}, got shape {tuple(lengths.shape)}")
        budget = self.optim.max_tokens_per_microbatch if micro_batch_size is None else None
        if budget is not None and lengths is not None:
            if self._pp_size == 1:
                return plan_token_budget(lengths, budget)
            # Pipeline p2p exchanges fixed-shape activations: one width, a size that divides the batch.
            width = max(2, int(lengths.max()))
            return plan_fixed(b, width, pipeline_micro_batch_size(b, width, budget))
        mbs = self.optim.micro_batch_size if micro_batch_size is None else micro_batch_size
        if mbs < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {mbs}")
        if self._pp_size > 1 and b % mbs != 0:
            raise ValueError(
                f"with pipeline parallelism the batch ({b}) must be a multiple of micro_batch_size ({mbs})"
            )
        return plan_fixed(b, s, mbs)

    def _micro_batches(
        self, tokens: torch.Tensor, extras: Mapping[str, torch.Tensor], plan: list[MicroBatch]
    ) -> list[dict[str, Any]]:
        """The tensors of each planned micro-batch on the device; token-aligned extras
        (second dimension ``S`` or ``S-1``) are cut to the micro-batch's width with the tokens,
        and the tokens padded to the multiple FP8 needs (``seq_len`` keeps the real width)."""
        s = tokens.shape[1]

        def cut(value: torch.Tensor, mb: MicroBatch) -> torch.Tensor:
            rows = value[mb.index]
            if value.dim() >= 2 and value.shape[1] in (s, s - 1) and mb.width < s:
                rows = rows[:, : mb.width - (s - value.shape[1])]
            return rows.to(self.device)

        out = []
        for mb in plan:
            mb_tokens = tokens[mb.index, : mb.width]
            padded = padded_length(mb.width, self.sequence_multiple)
            if padded > mb.width:
                # Appended positions: causal attention keeps them out of every real position.
                mb_tokens = torch.nn.functional.pad(mb_tokens, (0, padded - mb.width), value=0)
            out.append(
                {"tokens": mb_tokens.to(self.device), "seq_len": mb.width, "extras": {k: cut(v, mb) for k, v in extras.items()}}
            )
        return out

    def _stats(self, output: torch.Tensor, tokens: torch.Tensor, seq_len: int) -> dict[str, torch.Tensor]:
        """The model's output for padded ``tokens [b, S']`` -> ``logp``, ``entropy`` (and ``ebar``
        when :attr:`ebar`), each ``[b, S-1]`` fp32 for the first ``seq_len = S`` (real) positions.

        ``output`` is the logits ``[b, S', V_local]``, or with the fused path the final
        hidden states ``[S', b, h]`` (sequence first, as Megatron keeps them).
        """
        targets = tokens[:, 1:seq_len]
        if self.fused_token_stats:
            weight = output_weight(self.module)  # [V_local, h]; shards are equal (Megatron's layout)
            # [S-1, b] statistics of [S-1, b, h] hidden states; the transposes are views.
            logp, entropy, ebar = fused_linear_token_stats(
                output[: seq_len - 1], weight, targets.t(),
                vocab_start=self._tp_rank * weight.shape[0], temperature=self.temperature, group=self._tp_group,
                ebar=self.ebar,
            )
            logp, entropy, ebar = logp.t(), entropy.t(), ebar.t()
        else:
            logp, entropy, ebar = self.token_stats_fn(output[:, : seq_len - 1], targets, self.temperature)
        stats = {"logp": logp, "entropy": entropy}
        if self.ebar:
            stats["ebar"] = ebar.detach()
        return stats

    def _forward_step(
        self, loss_fn: LossFn | None, data_iterator: Iterator[dict[str, Any]], model: torch.nn.Module
    ) -> tuple[torch.Tensor, Callable[..., Any]]:
        """Megatron ``forward_step_func``: returns the logits and the loss closure."""
        batch = next(data_iterator)
        tokens = batch["tokens"]
        position_ids = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)
        # attention_mask None: the layer spec applies the causal mask itself.
        with final_hidden_states(self.module) if self.fused_token_stats else contextlib.nullcontext():
            output = model(tokens, position_ids, None)
        return output, partial(self._loss_func, loss_fn, batch)

    def _loss_func(
        self, loss_fn: LossFn | None, batch: dict[str, Any], output: torch.Tensor, non_loss_data: bool = False
    ):
        stats = self._stats(output, batch["tokens"], batch["seq_len"])
        if non_loss_data:  # compute_token_stats (forward only)
            return stats
        assert loss_fn is not None
        out = loss_fn(stats, batch["extras"])
        if not isinstance(out, tuple) or len(out) not in (2, 3):
            raise ValueError("loss_fn must return (loss, metrics) or (loss, metrics, row_outputs)")
        loss, metrics = out[0], out[1]
        rows = out[2] if len(out) == 3 else {}
        if loss.dim() != 0:
            raise ValueError(f"loss_fn must return a 0-dim loss, got shape {tuple(loss.shape)}")
        # float64: sums over micro-batches and DP ranks of token-weighted statistics.
        reported = {"loss": loss.detach().double()}
        for key, value in metrics.items():
            if key == "loss" or key.startswith(ROW_PREFIX):
                raise ValueError(f"loss_fn metrics must not use the reserved key {key!r}")
            reported[key] = torch.as_tensor(value, dtype=torch.float64).detach()
        b = batch["tokens"].shape[0]
        for key, value in rows.items():
            if value.dim() != 1 or value.shape[0] != b:
                raise ValueError(f"loss_fn row output {key!r} must have shape [{b}], got {tuple(value.shape)}")
            reported[ROW_PREFIX + key] = value.detach().to(torch.float64)
        # 3-tuple + calculate_per_token_loss: megatron does not rescale the loss. The count
        # is only accumulated for finalize_model_grads, which ignores it (module doc).
        return loss, torch.ones((), dtype=torch.int, device=output.device), reported

    def _run_schedule(self, micro_batches: list[dict[str, Any]], loss_fn: LossFn | None, forward_only: bool) -> list:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        forward_backward = get_forward_backward_func()
        return forward_backward(
            forward_step_func=partial(self._forward_step, loss_fn),
            data_iterator=iter(micro_batches),
            model=[self.model],
            num_microbatches=len(micro_batches),
            seq_length=micro_batches[0]["tokens"].shape[1],
            micro_batch_size=micro_batches[0]["tokens"].shape[0],  # fixed with PP; unused without
            forward_only=forward_only,
            collect_non_loss_data=forward_only,
        )

    # ------------------------------------------------------------------ public API
    @torch.no_grad()
    def compute_token_stats(
        self, tokens: torch.Tensor, *, micro_batch_size: int | None = None, lengths: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Per-token ``logp``, ``entropy`` (and ``ebar`` when :attr:`ebar`), each ``[B, S-1]`` fp32 nats, without grad.

        Runs in micro-batches of ``micro_batch_size`` (default: the optimizer
        config's) through Megatron's schedule (forward only). ``tokens`` are
        this DP rank's rows; the result covers exactly those rows and is
        returned on every TP rank and pipeline stage (computed on the last
        stage, then broadcast over the pipeline group). With ``lengths`` (int
        ``[B]`` tokens per row) and ``optim.max_tokens_per_microbatch``, rows are
        packed by length; positions past a micro-batch's width are 0
        (values at padding positions carry no meaning in either plan).
        """
        plan = self._plan(tokens, {}, micro_batch_size, lengths)
        self._check_memory(plan)
        micro_batches = self._micro_batches(tokens, {}, plan)
        self.model.eval()
        try:
            outputs = self._run_schedule(micro_batches, None, forward_only=True)
        finally:
            self.model.train()
        keys = ("logp", "entropy", "ebar") if self.ebar else ("logp", "entropy")
        b, s = tokens.shape
        if self._is_last_stage:
            stacked = torch.zeros(len(keys), b, s - 1, dtype=torch.float32, device=self.device)
            for mb, out in zip(plan, outputs):
                rows = mb.index.to(self.device)
                for i, key in enumerate(keys):
                    stacked[i, rows, : mb.width - 1] = out[key].float()
        else:
            stacked = torch.empty(len(keys), b, s - 1, dtype=torch.float32, device=self.device)
        stacked = self._broadcast_from_last_stage(stacked)
        return dict(zip(keys, stacked.unbind(0)))

    def forward_backward(
        self,
        tokens: torch.Tensor,
        extras: Mapping[str, torch.Tensor],
        loss_fn: LossFn,
        *,
        micro_batch_size: int | None = None,
        lengths: torch.Tensor | None = None,
    ) -> StepReport:
        """Zero the gradients, then accumulate ``grad(sum of loss_fn over micro-batches)``.

        After the call every parameter's ``main_grad`` holds the gradient summed
        over micro-batches and DP ranks (see :meth:`gradients`). Returns the loss
        and metrics summed over micro-batches and DP ranks, and the loss's
        per-row outputs for this rank's rows, on every rank (from the last
        pipeline stage).
        """
        if self._offloaded is not None:
            raise RuntimeError("forward_backward inside offloaded_for_generation(): the gradient buffers are freed")
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        plan = self._plan(tokens, extras, micro_batch_size, lengths)
        self._check_memory(plan)
        reported = self._run_schedule(self._micro_batches(tokens, extras, plan), loss_fn, forward_only=False)
        report = self._reduce_reported(reported, torch.cat([mb.index for mb in plan]))
        report["num_microbatches"] = float(len(plan))
        return report

    def _check_memory(self, plan: list[MicroBatch]) -> None:
        """Refuse, before any allocation and on every rank alike, a plan whose largest micro-batch's
        loss pass would not fit in the last stage's free memory (:mod:`~nemo_gdro.trainer.loss_memory`)."""
        problem = None
        if self._is_last_stage:
            tokens = max(len(mb.index) * padded_length(mb.width, self.sequence_multiple) for mb in plan)
            problem = loss_pass_problem(
                tokens, vocab_local=self.spec.vocab_size // self._tp_size, hidden=self.spec.hidden_size,
                param_bytes=torch.empty((), dtype=self._params_dtype).element_size(),
                fused=self.fused_token_stats, device=self.device,
            )
        if not _all_ranks(problem is None):  # every rank stops, none waits in a collective
            raise RunError(problem or "a micro-batch's loss pass does not fit in memory on another rank: lower "
                           "trainer.micro_batch_size or set trainer.max_tokens_per_microbatch")

    def _reduce_reported(self, reported: list[dict[str, torch.Tensor]], row_order: torch.Tensor) -> StepReport:
        """The one channel out of the loss: scalars summed over micro-batches and DP ranks,
        row outputs concatenated in row order (this rank's rows), both shared with every stage."""
        totals: dict[str, float] = {}
        row_keys: list[str] = []
        rows: torch.Tensor | None = None
        if self._is_last_stage and reported:
            keys = sorted(k for k in reported[0] if not k.startswith(ROW_PREFIX))
            summed = torch.stack([sum(r[k].cpu() for r in reported) for k in keys])
            # All ranks of this DP group are last-stage ranks: the collective is well formed.
            summed = comm.all_reduce(summed, group=self._dp_group)
            totals = {k: float(v) for k, v in zip(keys, summed.tolist())}
            row_keys = sorted(k for k in reported[0] if k.startswith(ROW_PREFIX))
            if row_keys:
                # Micro-batches hold rows in plan order: put each value back at its row.
                rows = torch.empty(len(row_keys), row_order.numel(), dtype=torch.float64)
                rows[:, row_order] = torch.stack([torch.cat([r[k].cpu() for r in reported]) for k in row_keys])
        if self._pp_size > 1:
            # The metric names are only known on the last stage: ship the small dict as an object.
            box: list[Any] = [(totals, row_keys)]
            dist.broadcast_object_list(box, src=self._last_stage_rank, group=self._pp_group)
            totals, row_keys = box[0]
            if row_keys:
                if rows is None:
                    rows = torch.empty(len(row_keys), row_order.numel(), dtype=torch.float64)
                rows = self._broadcast_from_last_stage(rows)
        report = StepReport(totals)
        if rows is not None:
            report.rows = {k[len(ROW_PREFIX) :]: v for k, v in zip(row_keys, rows.unbind(0))}
        return report

    def gradients(self) -> dict[str, torch.Tensor]:
        """Copies of the accumulated gradients by parameter name (fp32 ``main_grad``).

        With the distributed optimizer and DP > 1 the gradients are
        reduce-scattered: only this rank's shard of each buffer holds the sum.
        """
        return {name: p.main_grad.detach().clone() for name, p in self.module.named_parameters()}

    def grads_finite(self) -> bool:
        """Whether every accumulated gradient (``main_grad``) is finite, on every rank of the job (collective)."""
        grads = [g for g in (getattr(p, "main_grad", None) for p in self.module.parameters()) if g is not None]
        return _all_ranks(_finite(grads))

    def weights_finite(self) -> bool:
        """Whether every parameter is finite, on every rank of the job (collective)."""
        return _all_ranks(_finite(list(self.module.parameters())))

    def optimizer_step(self) -> dict[str, float]:
        """Clip (global norm), step AdamW at the scheduled LR, zero gradients.

        Returns ``grad_norm`` (before clipping, L2 over all parameters and
        model-parallel ranks) and ``lr``.
        """
        lr = self.optim.lr_at(self.step_count)
        for group in self.optimizer.param_groups:
            # Megatron leaves lr / weight decay per group to its scheduler (lr_mult, wd_mult).
            group["lr"] = lr * group.get("lr_mult", 1.0)
            group["weight_decay"] = self.optim.weight_decay * group.get("wd_mult", 1.0)
        success, grad_norm, _ = self.optimizer.step()
        if not success:  # only fp16 loss scaling can skip a step
            raise RuntimeError("optimizer step skipped (inf/nan gradients)")
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        self.step_count += 1
        return {"grad_norm": float(grad_norm), "lr": lr}

    def train_step(
        self,
        tokens: torch.Tensor,
        extras: Mapping[str, torch.Tensor],
        loss_fn: LossFn,
        *,
        micro_batch_size: int | None = None,
        lengths: torch.Tensor | None = None,
    ) -> StepReport:
        """One optimizer step over the ``B`` rows of ``tokens``.

        Args:
            tokens: int64 ``[B, S]``.
            extras: per-row tensors ``[B, ...]`` sliced into micro-batches for ``loss_fn``.
            loss_fn: see :data:`LossFn`; its loss is normalised by the global token count.
            micro_batch_size: rows per forward/backward (default ``optim.micro_batch_size``);
                the gradient does not depend on it.
            lengths: int ``[B]`` tokens per row; with ``optim.max_tokens_per_microbatch``
                rows are packed by length under that budget (same gradient).
        Returns:
            ``loss`` (sum over micro-batches and DP ranks), ``grad_norm``, ``lr``,
            ``num_microbatches`` (this rank's) and each metric of ``loss_fn`` summed over
            micro-batches and DP ranks (so metrics, like the loss, should be
            normalised by global counts), identical on every rank; per-row
            outputs of ``loss_fn`` in ``.rows`` (see :class:`StepReport`).
        """
        out = self.forward_backward(tokens, extras, loss_fn, micro_batch_size=micro_batch_size, lengths=lengths)
        out.update(self.optimizer_step())
        return out

    # ------------------------------------------------------------------ weights and checkpoints
    def export_hf_state_dict(self) -> dict[str, torch.Tensor]:
        """The FULL HF Qwen2/Qwen3 state dict of the current weights, on every rank.

        Collective over TP x PP (shards gathered, stages exchanged); copies.
        """
        return export_to_hf(self.module, self.spec)

    def import_hf_state_dict(self, hf_state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load a full HF-layout state dict (every rank passes the same one and takes its shard).

        Adam moments untouched; the optimizer's fp32 master copies (bf16 params) follow the new weights.
        """
        import_from_hf(self.module, self.spec, hf_state_dict)
        self.optimizer.reload_model_params()

    def load_hf_weights(self, source: Any) -> None:
        """Load an HF checkpoint directory (or state dict) straight into this rank's TP/PP shard.

        Collective over the model-parallel group; each rank reads only its slices
        (:func:`nemo_gdro.models.hf_weights.load_hf_weights`). The fp32 master
        copies of bf16 parameters are refreshed.
        """
        from nemo_gdro.models.hf_weights import load_hf_weights

        load_hf_weights(self.module, self.spec, source)
        self.optimizer.reload_model_params()

    def state_dict(self) -> dict[str, Any]:
        """Model, optimizer and schedule state (live references; ``torch.save`` or deep-copy it).

        Collective over DP with the distributed optimizer: its sharded Adam
        state and fp32 master weights are gathered on DP rank 0 (into host
        memory; other ranks hold ``None`` there), which is the copy a
        checkpoint keeps (plain DP: rank 0 writes the actor; TP/PP: the
        DP-rank-0 slice of each position is the one loaded), and
        :meth:`load_state_dict` scatters it again from DP rank 0.
        """
        return {
            "model": {k: v for k, v in self.module.state_dict().items() if not k.endswith("_extra_state")},
            "optimizer": self._optimizer_state_dict(),
            "schedule": {"step_count": self.step_count},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Inverse of :meth:`state_dict`; a resumed actor continues bit-identically."""
        missing, unexpected = self.module.load_state_dict(state["model"], strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise KeyError(f"model state mismatch: missing {missing}, unexpected {list(unexpected)}")
        self._load_optimizer_state_dict(state["optimizer"])
        self.step_count = int(state["schedule"]["step_count"])

    # ------------------------------------------------------------------ optimizer state
    def _megatron_optimizers(self) -> list[Any]:
        """The Megatron optimizers under the (chained) optimizer: one per parameter dtype group."""
        return list(getattr(self.optimizer, "chained_optimizers", [self.optimizer]))

    def _optimizer_state_dict(self) -> dict[str, Any]:
        if not self.megatron.distributed_optimizer:
            return self.optimizer.state_dict()
        optimizers = self._megatron_optimizers()
        if not any(len(o.optimizer.state) for o in optimizers):
            # Megatron's DistributedOptimizer cannot describe state before its first step.
            return {"distributed": True, "fresh": True}
        return {
            "distributed": True,
            "common": self.optimizer.state_dict(),
            # Full state on DP rank 0 only: every rank holding it would cost the whole model's fp32
            # weights and moments in host memory per rank.
            "param_state": [o.get_parameter_state_dp_zero() for o in optimizers],
        }

    def _load_optimizer_state_dict(self, state: Mapping[str, Any]) -> None:
        distributed = isinstance(state, Mapping) and bool(state.get("distributed"))
        if distributed != self.megatron.distributed_optimizer:
            raise ValueError(
                f"the optimizer state was saved with megatron.distributed_optimizer={str(distributed).lower()}, "
                f"this actor has {str(self.megatron.distributed_optimizer).lower()}"
            )
        if not distributed:
            self.optimizer.load_state_dict(state)
        elif state.get("fresh"):
            self.optimizer = self._build_optimizer(self.optim)
        else:
            self.optimizer.load_state_dict(state["common"])
            # no_grad: with fp32 parameters the master shards are views of the (leaf) model parameters.
            with torch.no_grad():
                for optimizer, param_state in zip(self._megatron_optimizers(), state["param_state"], strict=True):
                    with _step_state_set_aside(optimizer.optimizer):
                        optimizer.load_parameter_state_from_dp_zero(param_state)

    # ------------------------------------------------------------------ memory around generation
    @contextlib.contextmanager
    def offloaded_for_generation(self) -> Iterator[None]:
        """Context for the rollout phase: with ``megatron.offload_optimizer_during_generation``
        the optimizer state lives in host memory and the gradient buffers are freed inside it
        (:meth:`offload_optimizer_state`); otherwise (and on CPU) it does nothing.

        No training call may happen inside; :meth:`compute_token_stats` may (it needs neither).
        """
        if not self.megatron.offload_optimizer_during_generation:
            yield
            return
        self.offload_optimizer_state()
        try:
            yield
        finally:
            self.reload_optimizer_state()

    def offload_optimizer_state(self) -> int:
        """Move Adam moments and fp32 master weights to host memory and free the gradient buffers.

        GPU only (on CPU there is nothing to free: returns 0). Tensors that are
        views of model parameters (fp32 shards of the distributed optimizer)
        stay. Returns the bytes moved off the GPU (gradient buffers included).
        Idempotent; undone by :meth:`reload_optimizer_state`.
        """
        if self._offloaded is not None or self.device.type != "cuda":
            return 0
        model_storages = {p.untyped_storage().data_ptr() for p in self.module.parameters()}
        moved: list[tuple[Any, Any, torch.device]] = []
        nbytes = 0
        for optimizer in self._megatron_optimizers():
            inner = optimizer.optimizer
            for group in inner.param_groups:
                for p in group["params"]:
                    if p.is_cuda and p.untyped_storage().data_ptr() not in model_storages:
                        moved.append((p, None, p.device))
                        nbytes += p.numel() * p.element_size()
                        p.data = p.data.to("cpu")
            for param_state in inner.state.values():
                for key, value in param_state.items():
                    if isinstance(value, torch.Tensor) and value.is_cuda:
                        moved.append((param_state, key, value.device))
                        nbytes += value.numel() * value.element_size()
                        param_state[key] = value.to("cpu")
        nbytes += sum(b.grad_data.numel() * b.grad_data.element_size() for b in self.model.buffers)
        self.model.offload_grad_buffers()
        self._offloaded = moved
        return nbytes

    def reload_optimizer_state(self) -> None:
        """Undo :meth:`offload_optimizer_state`: every moved tensor back on its device, gradient
        buffers reallocated (zeroed). A no-op when nothing is offloaded."""
        if self._offloaded is None:
            return
        self.model.restore_grad_buffers()
        for holder, key, device in self._offloaded:
            if key is None:
                holder.data = holder.data.to(device)
            else:
                holder[key] = holder[key].to(device)
        self._offloaded = None
