"""The CPU compatibility shim for megatron-core and the distributed init helpers."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core")

from nemo_gdro.parallel import megatron_compat  # noqa: E402
from nemo_gdro.parallel.distributed import destroy_distributed, init_distributed, is_initialized  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU shim tests")


@pytest.fixture(scope="module")
def dist_env():
    info = init_distributed(seed=0)
    yield info
    destroy_distributed()


def test_apply_is_idempotent_and_leaves_torch_alone(dist_env):
    assert megatron_compat.apply_cpu_compat() is True
    assert megatron_compat.apply_cpu_compat() is True
    assert megatron_compat.cpu_compat_applied()
    # torch itself is untouched: only megatron's modules see the CPU stand-ins.
    import megatron.core.utils as mutils

    assert torch.cuda.current_device is not mutils.torch.cuda.current_device
    assert mutils.torch.cuda.current_device() == torch.device("cpu")
    assert mutils.torch.Tensor is torch.Tensor


def test_noop_when_cuda_available(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert megatron_compat.apply_cpu_compat() is False


def test_dist_info_single_process(dist_env):
    assert is_initialized()
    assert (dist_env.world_size, dist_env.tensor_parallel, dist_env.data_parallel) == (1, 1, 1)
    assert dist_env.backend == "gloo" and dist_env.device == torch.device("cpu")


def test_cuda_literals_allocate_on_cpu(dist_env):
    from megatron.core import parallel_state
    from megatron.core.transformer.utils import get_default_causal_mask

    mask = get_default_causal_mask(4)  # device="cuda" literal in megatron
    assert mask.device.type == "cpu" and mask.tolist()[0] == [False, True, True, True]
    buf = parallel_state.get_global_memory_buffer().get_tensor((2, 3), torch.float32, "t")
    assert buf.device.type == "cpu"


def test_rng_tracker_forks_cpu_generator(dist_env):
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    tracker = get_cuda_rng_tracker()
    torch.manual_seed(123)
    expected_outer = torch.rand(3)
    torch.manual_seed(123)
    with tracker.fork():
        inside_1 = torch.rand(3)
    outer = torch.rand(3)
    with tracker.fork():
        inside_2 = torch.rand(3)
    # The outer stream continues as if the forks never happened; the forked stream advances.
    assert torch.equal(outer, expected_outer)
    assert not torch.equal(inside_1, inside_2)
    assert not torch.equal(inside_1, expected_outer)


def test_reinit_reproduces_rng_streams(dist_env):
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    destroy_distributed()
    init_distributed(seed=7)
    with get_cuda_rng_tracker().fork():
        a = torch.rand(4)
    destroy_distributed()
    init_distributed(seed=7)
    with get_cuda_rng_tracker().fork():
        b = torch.rand(4)
    assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match="already initialised"):
        init_distributed(seed=7)
    # Leave the fixture's world as it was (seed 0).
    destroy_distributed()
    init_distributed(seed=0)


def test_clip_grad_by_total_norm_on_cpu(dist_env):
    from megatron.core.optimizer import clip_grads

    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.full((4,), 3.0)
    clip_grads.clip_grad_by_total_norm_fp32([p], max_norm=1.0, total_norm=6.0)
    torch.testing.assert_close(p.grad, torch.full((4,), 3.0 / (6.0 + 1e-6)))
    norm = clip_grads.get_grad_norm_fp32([torch.full((4,), 3.0)])
    assert norm == pytest.approx(6.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_mixed_precision_optimizer_builds_on_cpu_and_params_keep_their_type(dist_env, dtype):
    """Patch 5: Megatron's Float16 optimizer sorts parameters by CUDA type names; on CPU it
    accepts them while it is being built, and afterwards ``type()`` is the real method again."""
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    params = [torch.nn.Parameter(torch.randn(4, 3).to(dtype)), torch.nn.Parameter(torch.randn(3).float())]
    inner = torch.optim.AdamW(params, lr=0.1)
    config = OptimizerConfig(optimizer="adam", lr=0.1, bf16=True, params_dtype=torch.bfloat16)
    opt = Float16OptimizerWithFloat16Params(inner, config, None, None)
    expected_float16 = [params[0]] if dtype == torch.bfloat16 else []
    assert [p for g in opt.float16_groups for p in g] == expected_float16
    assert all(m.dtype == torch.float32 for g in opt.fp32_from_float16_groups for m in g)
    for p in params:
        assert "type" not in vars(p) and p.type().startswith("torch.") and "cuda" not in p.type()
    assert params[0].type(torch.float64).dtype == torch.float64
