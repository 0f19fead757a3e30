"""MegatronActor's GPU paths on CPU: bf16 parameters, FP8 sequence padding, activation recompute,
the distributed optimizer at DP=2 (gloo), optimizer offload around generation, fail-fast checks."""

from __future__ import annotations

import io
import os

import pytest
import torch

pytest.importorskip("megatron.core")

from nemo_gdro.models.gpt import PRESETS  # noqa: E402
from nemo_gdro.models.megatron_options import MegatronOptions  # noqa: E402
from nemo_gdro.parallel.distributed import destroy_distributed, init_distributed  # noqa: E402
from nemo_gdro.trainer.actor import MegatronActor, OptimConfig  # noqa: E402
from nemo_gdro.typed_config import ConfigError  # noqa: E402

SPEC = PRESETS["tiny"]
B, S = 4, 13


@pytest.fixture(scope="module")
def dist_env():
    info = init_distributed(seed=0)
    yield info
    destroy_distributed()


def _batch(seed: int = 0, rows: int = B) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Right-padded rows of varied length; the mask selects the targets of each row's real tokens."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, SPEC.vocab_size, (rows, S), generator=g)
    mask = torch.zeros(rows, S - 1)
    for i in range(rows):
        n = S - (i % 4) * 2
        tokens[i, n:] = 0
        mask[i, 2 : n - 1] = 1.0
    return tokens, {"mask": mask, "advantages": torch.randn(rows, generator=g)}


def _loss(global_tokens: float):
    def loss_fn(stats, extras):
        m = extras["mask"]
        pg = -(extras["advantages"].unsqueeze(1) * stats["logp"] * m).sum()
        return (pg - 0.01 * (stats["entropy"] * m).sum()) / global_tokens, {}

    return loss_fn


def _params(actor: MegatronActor) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in actor.module.named_parameters()}


# ---------------------------------------------------------------------------- bf16
def test_bf16_parameters_train_with_fp32_master_weights(dist_env):
    actor = MegatronActor(SPEC, OptimConfig(lr=1e-2, micro_batch_size=2), seed=3, params_dtype=torch.bfloat16)
    tokens, extras = _batch()
    mask = extras["mask"]

    def sft(stats, ex):
        return -(stats["logp"] * ex["mask"]).sum() / float(mask.sum()), {}

    assert actor.module.embedding.word_embeddings.weight.dtype == torch.bfloat16
    (inner,) = actor._megatron_optimizers()
    assert type(inner).__name__ == "Float16OptimizerWithFloat16Params"
    losses = [actor.train_step(tokens, extras, sft)["loss"] for _ in range(5)]
    assert losses[-1] < losses[0] - 0.3, losses
    for group in inner.fp32_from_float16_groups:
        assert all(p.dtype == torch.float32 for p in group)


def test_bf16_master_weights_follow_loaded_hf_weights(dist_env):
    """``load_hf_weights`` refreshes the fp32 master copies: the next step starts from the loaded weights."""
    source = MegatronActor(SPEC, OptimConfig(lr=1e-2, micro_batch_size=2), seed=11, params_dtype=torch.bfloat16)
    hf = source.export_hf_state_dict()
    tokens, extras = _batch(seed=1)
    loss_fn = _loss(float(extras["mask"].sum()))

    loaded = MegatronActor(SPEC, OptimConfig(lr=1e-3, micro_batch_size=2), seed=12, params_dtype=torch.bfloat16)
    loaded.load_hf_weights(hf)
    (inner,) = loaded._megatron_optimizers()
    for model_group, master_group in zip(inner.float16_groups, inner.fp32_from_float16_groups):
        for p, master in zip(model_group, master_group):
            assert torch.equal(master, p.float())
    reference = MegatronActor(SPEC, OptimConfig(lr=1e-3, micro_batch_size=2), seed=11, params_dtype=torch.bfloat16)
    assert loaded.train_step(tokens, extras, loss_fn) == reference.train_step(tokens, extras, loss_fn)
    for name, p in _params(loaded).items():
        assert torch.equal(p, _params(reference)[name]), name


# ---------------------------------------------------------------------------- sequence padding (FP8 / SP)
@pytest.mark.parametrize("multiple", [16, 128])
def test_sequence_padding_changes_nothing(dist_env, multiple):
    tokens, extras = _batch(seed=2)
    loss_fn = _loss(float(extras["mask"].sum()))
    plain = MegatronActor(SPEC, OptimConfig(micro_batch_size=3), seed=4)
    padded = MegatronActor(SPEC, OptimConfig(micro_batch_size=3), seed=4, sequence_multiple=multiple)
    seen: list[int] = []
    padded.module.embedding.register_forward_hook(lambda m, args, out: seen.append(out.shape[0]))  # [S, b, h]

    ref = plain.forward_backward(tokens, extras, loss_fn)
    out = padded.forward_backward(tokens, extras, loss_fn)
    assert seen and set(seen) == {multiple}  # the model really ran on padded micro-batches
    assert out["loss"] == pytest.approx(ref["loss"], abs=1e-6)
    ref_grads = plain.gradients()
    for name, g in padded.gradients().items():
        torch.testing.assert_close(g, ref_grads[name], rtol=0, atol=1e-6, msg=name)
    stats, ref_stats = padded.compute_token_stats(tokens), plain.compute_token_stats(tokens)
    for key in ("logp", "entropy", "ebar"):
        assert stats[key].shape == (B, S - 1)
        torch.testing.assert_close(stats[key], ref_stats[key], rtol=0, atol=1e-6)


def test_fp8_sequence_multiple_comes_from_the_section(dist_env):
    assert MegatronActor(SPEC, OptimConfig(), seed=0).sequence_multiple == 1
    with pytest.raises(ValueError, match="sequence_multiple must be >= 1"):
        MegatronActor(SPEC, OptimConfig(), seed=0, sequence_multiple=0)


# ---------------------------------------------------------------------------- activation recompute
@pytest.mark.parametrize(
    "options, module, calls",
    [
        ({"recompute_granularity": "selective"}, "self_attention.core_attention", 2),
        ({"recompute_granularity": "selective", "recompute_modules": ("core_attn", "mlp")}, "mlp", 2),
        ({"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}, "", 2),
        ({"recompute_granularity": "full", "recompute_method": "block", "recompute_num_layers": 1}, "", 2),
    ],
)
def test_recompute_gives_the_same_gradients(dist_env, options, module, calls):
    tokens, extras = _batch(seed=3)
    loss_fn = _loss(float(extras["mask"].sum()))
    plain = MegatronActor(SPEC, OptimConfig(micro_batch_size=B), seed=6)
    actor = MegatronActor(SPEC, OptimConfig(micro_batch_size=B), seed=6, megatron=MegatronOptions(**options))
    count = [0]
    target = actor.module.decoder.layers[0].get_submodule(module)
    target.register_forward_hook(lambda *args: count.__setitem__(0, count[0] + 1))
    ref = plain.forward_backward(tokens, extras, loss_fn)
    out = actor.forward_backward(tokens, extras, loss_fn)
    assert count[0] == calls  # forward, then recomputed in backward: the option took effect
    assert out["loss"] == ref["loss"]
    ref_grads = plain.gradients()
    for name, g in actor.gradients().items():
        torch.testing.assert_close(g, ref_grads[name], rtol=0, atol=1e-7, msg=name)


# ---------------------------------------------------------------------------- checks and offload
def test_fp8_without_transformer_engine_fails_before_building(dist_env):
    fp8 = MegatronOptions(transformer_impl="transformer_engine", fp8="e4m3")
    with pytest.raises(ConfigError, match="megatron.fp8=e4m3 needs model.dtype=bfloat16"):
        MegatronActor(SPEC, OptimConfig(), seed=0, megatron=fp8)
    with pytest.raises(ConfigError, match="megatron.fp8=e4m3 needs NVIDIA Transformer Engine"):
        MegatronActor(SPEC, OptimConfig(), seed=0, megatron=fp8, params_dtype=torch.bfloat16)
    with pytest.raises(ConfigError, match="megatron.recompute_num_layers=3 exceeds the 2 layers"):
        MegatronActor(SPEC, OptimConfig(), seed=0, megatron=MegatronOptions(
            recompute_granularity="full", recompute_method="block", recompute_num_layers=3))


def test_offload_around_generation_is_a_no_op_on_cpu(dist_env):
    tokens, extras = _batch(seed=4)
    loss_fn = _loss(float(extras["mask"].sum()))
    offload = MegatronOptions(offload_optimizer_during_generation=True)
    a = MegatronActor(SPEC, OptimConfig(lr=1e-2, micro_batch_size=2), seed=7, megatron=offload)
    b = MegatronActor(SPEC, OptimConfig(lr=1e-2, micro_batch_size=2), seed=7)
    for _ in range(2):
        with a.offloaded_for_generation():
            assert a.offload_optimizer_state() == 0  # CPU: nothing to free, nothing moved
            a.compute_token_stats(tokens)
        assert a.train_step(tokens, extras, loss_fn) == b.train_step(tokens, extras, loss_fn)
    assert all(torch.equal(p, q) for p, q in zip(a.module.parameters(), b.module.parameters()))


# ---------------------------------------------------------------------------- distributed optimizer, DP = 2
def _variants() -> dict[str, tuple[MegatronOptions, torch.dtype]]:
    dist = MegatronOptions(distributed_optimizer=True)
    return {
        "plain": (MegatronOptions(), torch.float32),
        "distributed": (dist, torch.float32),
        "distributed_overlap": (MegatronOptions(distributed_optimizer=True, overlap_grad_reduce=True), torch.float32),
        "plain_bf16": (MegatronOptions(), torch.bfloat16),
        "distributed_bf16": (dist, torch.bfloat16),
    }


def _dp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    import warnings

    warnings.filterwarnings("ignore")
    init_distributed(seed=0, init_method=f"file://{init_file}")
    try:
        tokens, extras = _batch(seed=5, rows=8)
        rows = slice(rank * 4, rank * 4 + 4)
        mine = (tokens[rows], {k: v[rows] for k, v in extras.items()})
        loss_fn = _loss(float(extras["mask"].sum()))
        optim = OptimConfig(lr=1e-2, weight_decay=0.1, micro_batch_size=2)
        results = {}
        for name, (options, dtype) in _variants().items():
            actor = MegatronActor(SPEC, optim, seed=1, megatron=options, params_dtype=dtype)
            reports = [actor.train_step(*mine, loss_fn) for _ in range(2)]
            results[name] = {"reports": reports, "params": _params(actor)}
            if name == "distributed":
                # DP rank 0's state holds the gathered optimizer state (as a checkpoint keeps it); every
                # rank loads that copy and DP rank 0 scatters it: the resumed actor continues bit-identically.
                state = actor.state_dict()
                results["param_state_held"] = [p is not None for p in state["optimizer"]["param_state"]]
                box = [state if rank == 0 else None]
                torch.distributed.broadcast_object_list(box, src=0)
                buffer = io.BytesIO()
                torch.save(box[0], buffer)
                buffer.seek(0)
                resumed = MegatronActor(SPEC, optim, seed=99, megatron=options)
                resumed.load_state_dict(torch.load(buffer, weights_only=False))
                results["continued"] = actor.train_step(*mine, loss_fn)
                results["resumed"] = resumed.train_step(*mine, loss_fn)
                results["resumed_equal"] = all(
                    torch.equal(p, q) for p, q in zip(actor.module.parameters(), resumed.module.parameters())
                )
                fresh = MegatronActor(SPEC, optim, seed=1, megatron=options)
                fresh_state = fresh.state_dict()  # before any step
                again = MegatronActor(SPEC, optim, seed=1, megatron=options)
                again.load_state_dict(fresh_state)
                results["fresh_equal"] = fresh.train_step(*mine, loss_fn) == again.train_step(*mine, loss_fn)
                results["state_keys"] = sorted(actor.state_dict()["optimizer"])
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        destroy_distributed()


@pytest.mark.slow
def test_distributed_optimizer_matches_the_plain_one_at_dp2(tmp_path):
    import torch.multiprocessing as mp

    mp.start_processes(
        _dp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True, start_method="spawn"
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for got in ranks:
        plain = got["plain"]
        for name, tol in (("distributed", 1e-6), ("distributed_overlap", 1e-6)):
            for ours, ref in zip(got[name]["reports"], plain["reports"]):
                assert ours["loss"] == pytest.approx(ref["loss"], abs=1e-6)
                assert ours["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5)
            for key, p in got[name]["params"].items():
                torch.testing.assert_close(p, plain["params"][key], rtol=0, atol=tol, msg=f"{name} {key}")
        # bf16: the same fp32 master update, rounded to bf16 (reduce-scatter vs all-reduce order: 1 ulp).
        for key, p in got["distributed_bf16"]["params"].items():
            ref = got["plain_bf16"]["params"][key]
            torch.testing.assert_close(p.float(), ref.float(), rtol=2**-7, atol=1e-6, msg=key)
        assert got["resumed_equal"] and got["resumed"] == got["continued"]
        assert got["fresh_equal"]
        assert got["state_keys"] == ["common", "distributed", "param_state"]
    assert all(ranks[0]["param_state_held"]) and not any(ranks[1]["param_state_held"])
    # Both DP ranks hold the same (replicated) weights after the steps.
    for key, p in ranks[0]["distributed"]["params"].items():
        assert torch.equal(p, ranks[1]["distributed"]["params"][key]), key
