"""Make megatron-core (0.16.x) run on CPU with the gloo backend.

Megatron-Core assumes a CUDA device: it calls ``torch.cuda.current_device()``
to place buffers, keeps its model-parallel RNG streams in CUDA generators,
creates CUDA streams for gradient communication and writes ``device="cuda"``
literals in a few hot paths. On a CPU-only host each of those raises
("Torch not compiled with CUDA enabled") or silently never runs (lazily queued
CUDA seeding).

:func:`apply_cpu_compat` installs the patches below, all of them confined to
megatron's own modules (torch itself is never modified, so transformers and
the rest of the process see the real ``torch.cuda``). It does nothing when
``torch.cuda.is_available()``: GPU runs use megatron unchanged.

Patches
-------
1. **Device redirection** (:class:`_CpuTorch`). In each module listed in
   ``_REDIRECTED_MODULES`` the module-global name ``torch`` is replaced by a
   thin proxy that forwards every attribute to the real torch except

   * ``torch.cuda`` -> :class:`_CpuCuda`: ``current_device()`` returns
     ``torch.device("cpu")`` (megatron passes it as ``device=`` when it
     allocates the DDP grad buffers, RoPE frequencies, ...),
     ``synchronize``/``empty_cache`` are no-ops, ``Stream``/``stream``/
     ``default_stream`` are inert stand-ins (DDP's communication stream; on CPU
     gloo collectives are synchronous anyway), and the RNG entry points
     (``manual_seed``, ``get_rng_state``, ``set_rng_state``) act on the CPU
     default generator (see 2.);
   * the tensor factories ``zeros``/``ones``/``empty``/``full``/``tensor``/
     ``arange`` map a ``device="cuda"`` argument to CPU (the pipeline
     schedules allocate ``total_num_tokens`` with ``device="cuda"``, the
     default causal mask in ``transformer/utils.py`` likewise, the optimizer's
     loss-scale and the grad-clipping scratch buffers too).

   Functions resolve the global ``torch`` at call time, so swapping the module
   global is enough; nothing that megatron already computed is touched.
2. **Model-parallel RNG tracker on the CPU generator.** megatron's
   ``CudaRNGStatesTracker`` keeps named RNG states (data-parallel,
   tensor-model-parallel, expert) in CUDA generators and ``fork()`` swaps them
   in and out; ``model_parallel_cuda_manual_seed`` seeds through
   ``torch.cuda.manual_seed``, which on a CPU-only build is queued lazily and
   never executed, and ``_get/_set_cuda_rng_state`` call into CUDA. On CPU the
   generator that initialisation and dropout actually draw from is the CPU
   default generator, so the tracker's states become CPU generator states:
   ``_get_cuda_rng_state``/``_set_cuda_rng_state`` are replaced by
   ``torch.get_rng_state``/``torch.set_rng_state`` and the proxied
   ``torch.cuda`` RNG calls of ``tensor_parallel/random.py`` map to the CPU
   ones. ``fork()`` keeps its meaning: inside it the CPU generator runs the
   named stream, afterwards the previous state is back.
3. **Gradient clipping** (``optimizer/clip_grads.clip_grad_by_total_norm_fp32``)
   asserts ``param.grad.type() == 'torch.cuda.FloatTensor'``, a string check
   that no device redirection can satisfy. It is replaced by a
   device-agnostic version with the same semantics (scale all grads in place
   by ``max_norm / (total_norm + 1e-6)`` when that is < 1). The norm itself
   (``get_grad_norm_fp32``) works through patch 1.

4. **Tied embeddings under pipeline parallelism.**
   ``LanguageModule.setup_embeddings_and_output_layer`` copies the first
   stage's embedding into the last stage's output layer with an all-reduce
   over the embedding group, after ``weight.data = weight.data.cuda()`` -- a
   tensor method no module-level redirection can reach. The replacement runs
   the original with the embedding-group test answering "no" (so it only
   zero-fills the last stage's copy and sets the parameter attributes) and
   then performs the same all-reduce itself, on the tensor's own device.
5. **Mixed-precision and distributed optimizers.** ``Float16OptimizerWithFloat16Params``
   (bf16 parameters with fp32 master weights) and ``DistributedOptimizer``
   sort parameters by ``param.type()`` strings (``'torch.cuda.BFloat16Tensor'``,
   ``'torch.cuda.FloatTensor'``) and reject anything else, so every CPU
   parameter is "wrong". For the duration of their constructors only, each
   parameter of the wrapped torch optimizer answers ``type()`` (no arguments)
   with its CUDA type name; ``type(dtype)`` conversions and everything after
   construction see the real method.

Megatron behaviour that needs configuration rather than a patch (done by the
callers): ``TransformerConfig.use_cpu_initialization=True`` on CPU, and
``config.finalize_model_grads_func`` must be set or DP ranks never reduce
their gradients.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import types
from typing import Any, Callable

import torch

__all__ = ["apply_cpu_compat", "cpu_compat_applied"]

# Megatron modules whose hard CUDA calls lie on the paths we run (model build,
# DDP buffers, forward/backward schedules, optimizer, clipping, RNG seeding).
_REDIRECTED_MODULES: tuple[str, ...] = (
    "megatron.core.utils",  # the global memory buffer used by core attention
    "megatron.core.timers",
    "megatron.core.rerun_state_machine",
    "megatron.core.parallel_state",
    "megatron.core.tensor_parallel.random",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.cross_entropy",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.data",
    "megatron.core.tensor_parallel.utils",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.pipeline_parallel.utils",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.finalize_model_grads",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.transformer.utils",
    "megatron.core.transformer.module",
    "megatron.core.transformer.attention",
    "megatron.core.transformer.dot_product_attention",
    "megatron.core.transformer.transformer_layer",
    "megatron.core.transformer.transformer_block",
    "megatron.core.transformer.mlp",
    "megatron.core.models.gpt.gpt_model",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.models.common.language_module.language_module",
)

_APPLIED = False


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


def _cpu_device_factory(factory: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Wrap a tensor factory so that ``device="cuda..."`` allocates on CPU."""

    @functools.wraps(factory)
    def wrapped(*args: Any, **kwargs: Any) -> torch.Tensor:
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return factory(*args, **kwargs)

    return wrapped


class _InertStream:
    """Stand-in for ``torch.cuda.Stream``: CPU work (and gloo) is synchronous."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, stream: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def record_event(self, event: Any = None) -> None:
        return None


class _CpuCuda(types.SimpleNamespace):
    """What megatron sees as ``torch.cuda`` on a CPU host (see module doc, patch 1/2)."""

    def __getattr__(self, name: str) -> Any:  # anything not overridden: the real one
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device() -> torch.device:
        return torch.device("cpu")

    @staticmethod
    def synchronize(device: Any = None) -> None:
        pass

    @staticmethod
    def empty_cache() -> None:
        pass

    Stream = _InertStream

    @staticmethod
    def stream(stream: Any) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    @staticmethod
    def default_stream(device: Any = None) -> _InertStream:
        return _InertStream()

    @staticmethod
    def current_stream(device: Any = None) -> _InertStream:
        return _InertStream()

    # RNG: the CPU default generator plays the CUDA generator's role.
    @staticmethod
    def manual_seed(seed: int) -> None:
        torch.manual_seed(seed)

    @staticmethod
    def manual_seed_all(seed: int) -> None:
        torch.manual_seed(seed)

    @staticmethod
    def get_rng_state(device: Any = None) -> torch.Tensor:
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(state: torch.Tensor, device: Any = None) -> None:
        torch.set_rng_state(state)

    @property
    def random(self) -> "_CpuCuda":  # ``torch.cuda.random.get_rng_state``
        return self


class _CpuTorch(types.ModuleType):
    """Proxy for the ``torch`` module inside selected megatron modules."""

    _FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange")

    def __init__(self) -> None:
        super().__init__("torch")
        self.cuda = _CpuCuda()
        for name in self._FACTORIES:
            setattr(self, name, _cpu_device_factory(getattr(torch, name)))

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


def _cpu_get_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    """CPU replacement of ``tensor_parallel.random._get_cuda_rng_state`` (patch 2)."""
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
    """CPU replacement of ``tensor_parallel.random._set_cuda_rng_state`` (patch 2)."""
    torch.set_rng_state(new_state)


def _clip_grad_by_total_norm(
    parameters: list[torch.Tensor] | torch.Tensor,
    max_norm: float,
    total_norm: float,
    use_decoupled_grad: bool = False,
) -> None:
    """Device-agnostic ``clip_grad_by_total_norm_fp32`` (patch 3); grads scaled in place."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr) for p in parameters if getattr(p, attr, None) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0:
        for g in grads:
            g.detach().mul_(clip_coeff)


def _cpu_setup_embeddings(original: Callable[[Any], None]) -> Callable[[Any], None]:
    """Wrap ``LanguageModule.setup_embeddings_and_output_layer`` for CPU (patch 4)."""

    @functools.wraps(original)
    def setup(self: Any) -> None:
        import torch.distributed as dist

        in_group = dist.is_initialized() and self._is_in_embd_group()
        # An instance attribute shadows the method for the duration of the original call only.
        self._is_in_embd_group = lambda: False
        try:
            original(self)
        finally:
            del self._is_in_embd_group
        tied = self.share_embeddings_and_output_weights or getattr(self.config, "mtp_num_layers", 0)
        if in_group and tied and self.config.pipeline_model_parallel_size > 1:
            dist.all_reduce(self.shared_embedding_or_output_weight().data, group=self.embd_group)

    return setup


@contextlib.contextmanager
def _params_report_cuda_type(params: list[torch.Tensor]) -> Any:
    """Inside the block ``p.type()`` of each of ``params`` is ``'torch.cuda.<Kind>Tensor'`` (patch 5)."""
    shadowed = []
    for p in params:
        if "type" in vars(p):
            continue
        real = p.type
        cuda_name = real().replace("torch.", "torch.cuda.", 1)

        def report(*args: Any, _real: Any = real, _name: str = cuda_name, **kwargs: Any) -> Any:
            return _name if not args and not kwargs else _real(*args, **kwargs)

        p.type = report  # type: ignore[method-assign]
        shadowed.append(p)
    try:
        yield
    finally:
        for p in shadowed:
            del p.type


def _cuda_typed_constructor(original: Callable[..., None]) -> Callable[..., None]:
    """Wrap an optimizer ``__init__(self, optimizer, ...)`` so its params pass the CUDA type checks (patch 5)."""

    @functools.wraps(original)
    def init(self: Any, optimizer: Any, *args: Any, **kwargs: Any) -> None:
        params = [p for group in getattr(optimizer, "param_groups", []) for p in group["params"]]
        with _params_report_cuda_type(params):
            original(self, optimizer, *args, **kwargs)

    return init


def cpu_compat_applied() -> bool:
    """Whether :func:`apply_cpu_compat` has patched megatron in this process."""
    return _APPLIED


def apply_cpu_compat() -> bool:
    """Patch megatron-core to run on CPU; no-op when CUDA is available.

    Idempotent. Returns ``True`` when the patches are (now) in place and
    ``False`` when CUDA is available and nothing was done.
    """
    global _APPLIED
    if torch.cuda.is_available():
        return False
    if _APPLIED:
        return True
    proxy = _CpuTorch()
    for name in _REDIRECTED_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:  # a module moved in another megatron version: nothing to redirect
            continue
        if getattr(module, "torch", None) is torch:
            module.torch = proxy  # type: ignore[attr-defined]

    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = _cpu_get_rng_state
    mrandom._set_cuda_rng_state = _cpu_set_rng_state

    from megatron.core.optimizer import clip_grads, optimizer

    clip_grads.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm
    # optimizer.py imported the function by name; rebind its reference too.
    if hasattr(optimizer, "clip_grad_by_total_norm_fp32"):
        optimizer.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm
    from megatron.core.models.common.language_module.language_module import LanguageModule

    LanguageModule.setup_embeddings_and_output_layer = _cpu_setup_embeddings(
        LanguageModule.setup_embeddings_and_output_layer
    )
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    for cls in (Float16OptimizerWithFloat16Params, DistributedOptimizer):
        cls.__init__ = _cuda_typed_constructor(cls.__init__)  # type: ignore[method-assign]
    _APPLIED = True
    return True
