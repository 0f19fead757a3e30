"""MegatronActor: gradients through Megatron's schedule, micro-batch invariance, SFT, checkpoints, DP=2."""

from __future__ import annotations

import dataclasses
import io
import math
import os

import pytest
import torch

pytest.importorskip("megatron.core")

from nemo_gdro.algorithms.token_stats import full_vocab_token_stats  # noqa: E402
from nemo_gdro.models.gpt import PRESETS, build_gpt  # noqa: E402
from nemo_gdro.models.megatron_options import MegatronOptions  # noqa: E402
from nemo_gdro.parallel.fused_linear_stats import chunk_rows_for  # noqa: E402
from nemo_gdro.parallel.distributed import destroy_distributed, init_distributed  # noqa: E402
from nemo_gdro.trainer.actor import MegatronActor, OptimConfig  # noqa: E402
from nemo_gdro.trainer.errors import RunError  # noqa: E402
from tests.parallel.test_fused_linear_stats import _LargestVocabTensor  # noqa: E402  (the same probe)

SPEC = PRESETS["tiny"]
B, S = 6, 20


@pytest.fixture(scope="module")
def dist_env():
    info = init_distributed(seed=0)
    yield info
    destroy_distributed()


def _batch(seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Right-padded rows: prompt of 4 tokens, responses of varied length, pad id 0."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, SPEC.vocab_size, (B, S), generator=g)
    lengths = torch.tensor([20, 17, 12, 20, 8, 15])
    mask = torch.zeros(B, S - 1)
    for i, n in enumerate(lengths.tolist()):
        tokens[i, n:] = 0
        mask[i, 3 : n - 1] = 1.0  # targets tokens[4:n]
    advantages = torch.randn(B, generator=g)
    return tokens, {"mask": mask, "advantages": advantages}


def _pg_loss(global_tokens: float):
    """Token-mean policy-gradient-style loss with an entropy bonus, global normalisation."""

    def loss_fn(stats, extras):
        m = extras["mask"]
        pg = -(extras["advantages"].unsqueeze(1) * stats["logp"] * m).sum()
        ent = (stats["entropy"] * m).sum()
        loss = (pg - 0.01 * ent + 0.1 * (stats["ebar"] * m).sum()) / global_tokens
        return loss, {"entropy": ent.detach() / global_tokens}

    return loss_fn


def _sft_loss(global_tokens: float):
    def loss_fn(stats, extras):
        return -(stats["logp"] * extras["mask"]).sum() / global_tokens, {}

    return loss_fn


def _reference_gradients(actor: MegatronActor, tokens, extras, loss_fn) -> tuple[float, dict[str, torch.Tensor]]:
    """Autograd gradient of the same loss in ONE plain forward (no Megatron schedule, no DDP)."""
    plain = build_gpt(SPEC)
    plain.load_state_dict(actor.module.state_dict())
    logits = plain(tokens, torch.arange(S).expand_as(tokens), None)
    logp, entropy, ebar = full_vocab_token_stats(logits[:, :-1], tokens[:, 1:], actor.temperature)
    loss, _ = loss_fn({"logp": logp, "entropy": entropy, "ebar": ebar.detach()}, extras)
    loss.backward()
    return float(loss), {n: p.grad for n, p in plain.named_parameters()}


@pytest.fixture(scope="module")
def actor(dist_env):
    return MegatronActor(SPEC, OptimConfig(lr=1e-2, micro_batch_size=2), seed=5, temperature=0.9)


def test_token_stats_match_plain_forward(actor):
    tokens, _ = _batch()
    stats = actor.compute_token_stats(tokens, micro_batch_size=4)  # uneven: 4 + 2 rows
    with torch.no_grad():
        logits = actor.module(tokens, torch.arange(S).expand_as(tokens), None)
    expected = full_vocab_token_stats(logits[:, :-1], tokens[:, 1:], 0.9)
    for key, ref in zip(("logp", "entropy", "ebar"), expected):
        assert stats[key].shape == (B, S - 1) and not stats[key].requires_grad
        torch.testing.assert_close(stats[key], ref, rtol=0, atol=1e-6)


def test_gradient_equals_plain_autograd_for_any_micro_batch_size(actor):
    tokens, extras = _batch()
    loss_fn = _pg_loss(float(extras["mask"].sum()))
    ref_loss, ref_grads = _reference_gradients(actor, tokens, extras, loss_fn)
    for mbs in (1, 2, 4, B):  # 4 leaves an uneven last micro-batch
        out = actor.forward_backward(tokens, extras, loss_fn, micro_batch_size=mbs)
        assert out["loss"] == pytest.approx(ref_loss, abs=1e-6)
        grads = actor.gradients()
        assert grads.keys() == ref_grads.keys()
        for name, g in grads.items():
            torch.testing.assert_close(g, ref_grads[name], rtol=0, atol=1e-6, msg=f"{name} (mbs={mbs})")
    actor.model.zero_grad_buffer()


def test_token_budget_micro_batches_equal_fixed_size(dist_env):
    """Rows packed by length (cut to each micro-batch's longest row) give the fixed-size
    results: token stats on every real position, loss, gradients, per-row outputs in row order."""
    budget = MegatronActor(SPEC, OptimConfig(lr=1e-2, micro_batch_size=2, max_tokens_per_microbatch=60), seed=5)
    tokens, extras = _batch()
    lengths = torch.tensor([20, 17, 12, 20, 8, 15])
    packed = budget.compute_token_stats(tokens, lengths=lengths)
    fixed = budget.compute_token_stats(tokens, micro_batch_size=2)
    real = torch.arange(S - 1).unsqueeze(0) < (lengths - 1).unsqueeze(1)
    for key in ("logp", "entropy", "ebar"):
        torch.testing.assert_close(packed[key][real], fixed[key][real], rtol=0, atol=1e-5)

    base = _pg_loss(float(extras["mask"].sum()))

    def loss_fn(stats, extras):
        loss, metrics = base(stats, extras)
        return loss, metrics, {"row_id": extras["row_id"]}

    extras = {**extras, "row_id": torch.arange(B, dtype=torch.float32)}
    ref = budget.forward_backward(tokens, extras, loss_fn, micro_batch_size=2)
    ref_grads = budget.gradients()
    out = budget.forward_backward(tokens, extras, loss_fn, lengths=lengths)
    assert out["num_microbatches"] == 2 < ref["num_microbatches"] == 3  # 20,20,17 | 15,12,8 under 60
    assert out["loss"] == pytest.approx(ref["loss"], abs=1e-6)
    assert out.rows["row_id"].tolist() == list(range(B))
    for name, g in budget.gradients().items():
        torch.testing.assert_close(g, ref_grads[name], rtol=0, atol=1e-6, msg=name)
    budget.model.zero_grad_buffer()


def test_sft_steps_reduce_loss(actor):
    tokens, extras = _batch(seed=1)
    loss_fn = _sft_loss(float(extras["mask"].sum()))
    losses = []
    for _ in range(6):
        out = actor.train_step(tokens, extras, loss_fn)
        losses.append(out["loss"])
        assert out["num_microbatches"] == 3 and out["lr"] == 1e-2 and out["grad_norm"] > 0
    assert losses[-1] < losses[0] - 0.3, losses


@pytest.mark.parametrize("grad_clip", [0.05, 0.0])
def test_warmup_and_clipping(dist_env, grad_clip):
    actor = MegatronActor(SPEC, OptimConfig(lr=1e-3, warmup_steps=4, grad_clip=grad_clip, micro_batch_size=3), seed=1)
    tokens, extras = _batch()
    loss_fn = _sft_loss(float(extras["mask"].sum()))
    actor.forward_backward(tokens, extras, loss_fn)
    norm = sum(g.pow(2).sum() for g in actor.gradients().values()).sqrt().item()
    out = actor.optimizer_step()
    assert out["grad_norm"] == pytest.approx(norm, rel=1e-5)  # reported before clipping
    assert out["lr"] == pytest.approx(2.5e-4)
    # After Adam's first step exp_avg = (1 - beta1) * (clipped) grad, so its global norm shows the clip.
    state = actor.optimizer.state_dict()["state"]
    m_norm = sum(s["exp_avg"].pow(2).sum() for s in state.values()).sqrt().item()
    clipped = min(norm, grad_clip) if grad_clip > 0 else norm
    assert norm > 0.05
    assert m_norm == pytest.approx(0.1 * clipped, rel=1e-4)
    assert actor.train_step(tokens, extras, loss_fn)["lr"] == pytest.approx(5e-4)
    assert actor.step_count == 2
    # Megatron's grouping: no weight decay on 1-D tensors (norms).
    for group in actor.optimizer.param_groups:
        for p in group["params"]:
            assert group["weight_decay"] == (0.0 if p.dim() == 1 else 0.1)


def test_state_dict_round_trip_continues_bit_identically(dist_env):
    optim = OptimConfig(lr=5e-3, warmup_steps=3, micro_batch_size=4)
    tokens, extras = _batch(seed=2)
    loss_fn = _pg_loss(float(extras["mask"].sum()))
    first = MegatronActor(SPEC, optim, seed=9)
    for _ in range(2):
        first.train_step(tokens, extras, loss_fn)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    out_first = first.train_step(tokens, extras, loss_fn)

    resumed = MegatronActor(SPEC, optim, seed=123)  # different init, overwritten by the checkpoint
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=False))
    out_resumed = resumed.train_step(tokens, extras, loss_fn)
    assert out_resumed == out_first
    for (n, a), (_, b) in zip(first.module.named_parameters(), resumed.module.named_parameters()):
        assert torch.equal(a, b), n
    assert resumed.step_count == first.step_count == 3


def test_reset_optimizer_starts_fresh(dist_env):
    tokens, extras = _batch(seed=3)
    loss_fn = _sft_loss(float(extras["mask"].sum()))
    trained = MegatronActor(SPEC, OptimConfig(lr=1e-2, micro_batch_size=3), seed=4)
    for _ in range(2):
        trained.train_step(tokens, extras, loss_fn)
    rl_optim = OptimConfig(lr=2e-3, warmup_steps=2, weight_decay=0.0, micro_batch_size=2)
    trained.reset_optimizer(rl_optim)
    assert trained.step_count == 0 and trained.optim == rl_optim
    fresh = MegatronActor(SPEC, rl_optim, seed=77)
    fresh.import_hf_state_dict(trained.export_hf_state_dict())
    assert trained.train_step(tokens, extras, loss_fn) == fresh.train_step(tokens, extras, loss_fn)
    for (n, a), (_, b) in zip(trained.module.named_parameters(), fresh.module.named_parameters()):
        assert torch.equal(a, b), n


def test_construction_is_seeded_and_leaves_rng_streams_alone(dist_env):
    torch.manual_seed(31)
    expected = torch.rand(3)
    torch.manual_seed(31)
    a = MegatronActor(SPEC, OptimConfig(), seed=8)
    assert torch.equal(torch.rand(3), expected)
    b = MegatronActor(SPEC, OptimConfig(), seed=8)
    assert all(torch.equal(x, y) for x, y in zip(a.module.parameters(), b.module.parameters()))


def test_export_hf_state_dict(actor):
    exported = actor.export_hf_state_dict()
    assert exported["model.embed_tokens.weight"].shape == (SPEC.vocab_size, SPEC.hidden_size)
    assert torch.equal(exported["model.norm.weight"], actor.module.decoder.final_layernorm.weight)
    exported["model.norm.weight"].add_(1.0)  # a copy: the model is unaffected
    assert not torch.equal(exported["model.norm.weight"], actor.module.decoder.final_layernorm.weight)


def test_input_validation(actor):
    tokens, extras = _batch()
    with pytest.raises(ValueError, match="int64"):
        actor.compute_token_stats(tokens.int())
    with pytest.raises(ValueError, match="extras\\['mask'\\]"):
        actor.forward_backward(tokens, {"mask": extras["mask"][:3]}, _sft_loss(1.0))
    with pytest.raises(ValueError, match="optim.lr"):
        OptimConfig(lr=0.0)


# ---------------------------------------------------------------------------- loss-pass paths
def test_loss_pass_paths_agree_on_a_training_step(dist_env):
    """Fused hidden-state path (default), chunked statistics over Megatron's logits, and the
    full-vocabulary reference: the same token statistics, loss, gradient norm and updated weights."""
    tokens, extras = _batch(1)
    loss_fn = _pg_loss(float(extras["mask"].sum()))
    optim = OptimConfig(lr=1e-2, micro_batch_size=4)
    actors = {
        "fused": MegatronActor(SPEC, optim, seed=7, temperature=0.8),
        "logits": MegatronActor(SPEC, optim, seed=7, temperature=0.8,
                                megatron=MegatronOptions(fused_linear_token_stats=False)),
        "reference": MegatronActor(SPEC, optim, seed=7, temperature=0.8, token_stats_fn=full_vocab_token_stats),
    }
    assert actors["fused"].fused_token_stats and actors["fused"].logits_path_reason is None
    assert actors["logits"].logits_path_reason == "megatron.fused_linear_token_stats=false"
    assert actors["reference"].logits_path_reason == "a caller's token_stats_fn"
    results = {}
    for name, a in actors.items():
        stats = a.compute_token_stats(tokens)
        out = a.forward_backward(tokens, extras, loss_fn)
        grads = a.gradients()
        out.update(a.optimizer_step())
        results[name] = (stats, out, grads)
    ref_stats, ref_out, ref_grads = results["reference"]
    for name in ("fused", "logits"):
        stats, out, grads = results[name]
        for key in ("logp", "entropy", "ebar"):
            torch.testing.assert_close(stats[key], ref_stats[key], rtol=1e-5, atol=1e-6, msg=f"{name} {key}")
        assert out["loss"] == pytest.approx(ref_out["loss"], rel=1e-5, abs=1e-7)
        assert out["grad_norm"] == pytest.approx(ref_out["grad_norm"], rel=1e-5)
        for key, g in grads.items():
            torch.testing.assert_close(g, ref_grads[key], rtol=1e-5, atol=1e-6, msg=f"{name} {key}")


def test_loss_pass_never_holds_a_micro_batchs_logits(dist_env):
    """At the real Qwen3 vocabulary the training pass only ever holds one chunk's logits
    (55 token rows of 151,936 in 32 MiB), not the micro-batch's 4 x 40. (Hidden size 32 < 55:
    the transposed ``[h, V]`` weight view is not mistaken for a logits chunk.)"""
    spec = dataclasses.replace(SPEC, vocab_size=151_936, hidden_size=32)
    actor = MegatronActor(spec, OptimConfig(lr=1e-3, micro_batch_size=4), seed=1)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, spec.vocab_size, (4, 40), generator=g)
    extras = {"mask": torch.ones(4, 39), "advantages": torch.randn(4, generator=g)}
    with _LargestVocabTensor(spec.vocab_size) as seen:
        out = actor.forward_backward(tokens, extras, _pg_loss(4 * 39.0))
    assert math.isfinite(out["loss"])
    assert 0 < seen.rows <= chunk_rows_for(None, spec.vocab_size, torch.float32, torch.device("cpu")) == 55
    actor.model.zero_grad_buffer()


def test_ebar_only_when_asked(dist_env):
    """Built with ebar=False (no stage reads it) the passes skip it; nothing else changes."""
    tokens, extras = _batch(2)
    optim = OptimConfig(lr=1e-2, micro_batch_size=3)
    seen: list[set[str]] = []
    base = _sft_loss(float(extras["mask"].sum()))

    def loss_fn(stats, extras):
        seen.append(set(stats))
        return base(stats, extras)

    results = []
    for ebar in (True, False):
        a = MegatronActor(SPEC, optim, seed=3, ebar=ebar)
        stats = a.compute_token_stats(tokens)
        assert set(stats) == ({"logp", "entropy", "ebar"} if ebar else {"logp", "entropy"})
        out = a.forward_backward(tokens, extras, loss_fn)
        results.append((stats, out["loss"], a.gradients()))
        a.model.zero_grad_buffer()
    assert seen == [{"logp", "entropy", "ebar"}] * 2 + [{"logp", "entropy"}] * 2
    (s1, l1, g1), (s2, l2, g2) = results
    assert l1 == l2
    for key in ("logp", "entropy"):
        torch.testing.assert_close(s1[key], s2[key], rtol=0, atol=0)
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], rtol=0, atol=0)


@pytest.mark.parametrize("fused", [True, False])
def test_micro_batch_too_large_for_memory_is_refused_before_the_pass(dist_env, monkeypatch, fused):
    from nemo_gdro.trainer import loss_memory

    a = MegatronActor(SPEC, OptimConfig(lr=1e-2, micro_batch_size=6), seed=4,
                      megatron=MegatronOptions(fused_linear_token_stats=fused))
    before = {k: v.clone() for k, v in a.module.state_dict().items() if "extra" not in k}
    monkeypatch.setattr(loss_memory, "free_memory_bytes", lambda device: 2**20)  # a host with 1 MiB free
    tokens, extras = _batch()
    for call in (lambda: a.compute_token_stats(tokens), lambda: a.train_step(tokens, extras, _sft_loss(1.0))):
        with pytest.raises(RunError) as err:
            call()
        msg = str(err.value)
        assert "\n" not in msg and "120 tokens" in msg and "1.00 MiB" not in msg
        assert "trainer.micro_batch_size" in msg and "trainer.max_tokens_per_microbatch" in msg
        assert ("megatron.fused_linear_token_stats=true" in msg) is not fused
    for k, v in a.module.state_dict().items():
        if k in before:
            assert torch.equal(v, before[k]), k
    monkeypatch.undo()
    assert a.compute_token_stats(tokens)["logp"].shape == (B, S - 1)


# ---------------------------------------------------------------------------- DP = 2 (gloo, 2 processes)
def _dp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    import warnings

    warnings.filterwarnings("ignore")
    init_distributed(seed=0, init_method=f"file://{init_file}")
    try:
        actor = MegatronActor(SPEC, OptimConfig(lr=1e-2, micro_batch_size=2), seed=5, temperature=0.9)
        tokens, extras = _batch()
        loss_fn = _pg_loss(float(extras["mask"].sum()))  # global count over both ranks' rows
        rows = slice(rank * B // world, (rank + 1) * B // world)
        out = actor.forward_backward(tokens[rows], {k: v[rows] for k, v in extras.items()}, loss_fn)
        torch.save({"out": out, "grads": actor.gradients()}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        destroy_distributed()


def test_data_parallel_two_ranks_sum_gradients(dist_env, tmp_path):
    import torch.multiprocessing as mp

    mp.start_processes(
        _dp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True, start_method="spawn"
    )
    fresh = MegatronActor(SPEC, OptimConfig(micro_batch_size=2), seed=5, temperature=0.9)
    tokens, extras = _batch()
    loss_fn = _pg_loss(float(extras["mask"].sum()))
    ref_loss, ref_grads = _reference_gradients(fresh, tokens, extras, loss_fn)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert got["out"]["loss"] == pytest.approx(ref_loss, abs=1e-6)  # summed over DP ranks
        for name, g in got["grads"].items():
            torch.testing.assert_close(g, ref_grads[name], rtol=0, atol=1e-6, msg=f"{name} rank {rank}")
