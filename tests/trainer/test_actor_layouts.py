"""The actor under TP, PP and DP gives the layout-independent result of the (1, 1, 1) reference.

One module-scoped set of 4 spawned gloo processes runs every layout. A process
joins one layout per round: it forms a fresh world (a new ``FileStore`` file,
``RANK``/``WORLD_SIZE`` relative to that layout) with the other processes of
the same layout, initialises Megatron for it, runs the scenario, writes what it
saw and tears everything down; processes without a layout in a round sit it
out. Two layouts of two ranks share a round, so the five layouts take three
rounds:

    round 0: ranks 0-1 (2,1,1)   ranks 2-3 (1,2,1)
    round 1: ranks 0-1 (1,1,2)   rank 2    (1,1,1)
    round 2: ranks 0-3 (2,2,1)

The scenario (same HF weights imported, same rows): ``compute_token_stats``
of the whole mini-batch, then one ``train_step`` with
``nemo_gdro.trainer.rl_loss.MinibatchLoss`` -- R²VPO with its dual variable,
DynaMO token modulation with mini-batch ``ModulationStats`` (merged over the
rank's rows, then reduced over DP), advantages scaled by per-row
Prompt-GDRO-style weights, the global token count all-reduced over DP --
at micro-batch size 2. DP ranks get disjoint, contiguous row slices.

Every rank of every layout must report, compared with (1, 1, 1): the token
statistics (its DP slice), the loss, R²VPO's V-hat and the updated lambda,
the modulation statistics, the controllers' per-row loss signal and the full
HF state dict exported after the step. Tolerance (fp32 everywhere): relative
1e-5 with an absolute floor of 1e-6 (``torch.testing.assert_close(rtol=1e-5,
atol=1e-6)``); layouts differ only in the order of floating-point sums (TP
splits matmul reductions and the vocabulary sums, DP sums gradients across
ranks), which moves fp32 results by ~1e-7 relative.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("megatron.core")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.slow

# 4 layers so that each of 2 pipeline stages holds 2 (global numbering is exercised);
# vocabulary 48 and 2 query groups split over TP = 2; tied embeddings (the last
# stage keeps a copy of the embedding).
LAYOUTS: tuple[tuple[int, int, int], ...] = ((1, 1, 1), (2, 1, 1), (1, 2, 1), (1, 1, 2), (2, 2, 1))
# Per round: (layout, first process rank) -- a layout of n ranks uses processes first..first+n-1.
ROUNDS: tuple[tuple[tuple[tuple[int, int, int], int], ...], ...] = (
    (((2, 1, 1), 0), ((1, 2, 1), 2)),
    (((1, 1, 2), 0), ((1, 1, 1), 2)),
    (((2, 2, 1), 0),),
)
NPROCS = 4
B, S, MBS = 8, 16, 2
RTOL, ATOL = 1e-5, 1e-6


def _spec():
    from nemo_gdro.models.gpt import PRESETS

    return dataclasses.replace(PRESETS["tiny"], num_layers=4)


def _hf_weights(spec) -> dict[str, torch.Tensor]:
    """Random HF weights; norms randomised too (HF initialises them to 1)."""
    from nemo_gdro.models.hf_mapping import hf_config

    torch.manual_seed(3)
    model = transformers.Qwen3ForCausalLM(hf_config(spec))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _batch(spec) -> dict[str, torch.Tensor]:
    """Right-padded rows (prompt of 4 tokens), per-row advantages, Prompt-GDRO-style weights, noise."""
    g = torch.Generator().manual_seed(11)
    tokens = torch.randint(1, spec.vocab_size, (B, S), generator=g)
    mask = torch.zeros(B, S - 1)
    for i, n in enumerate([16, 13, 9, 16, 7, 12, 15, 10]):
        tokens[i, n:] = 0
        mask[i, 3 : n - 1] = 1.0  # targets tokens[4:n]
    raw_adv = torch.randn(B, generator=g)
    weights = torch.tensor([0.5, 1.5, 1.0, 2.0, 0.75, 1.25, 1.0, 0.5])  # per-row (per-prompt bin) weights
    # Behaviour log-probs = current log-probs + noise, so ratios differ from 1.
    noise = 0.1 * torch.randn(B, S - 1, generator=g)
    return {"tokens": tokens, "mask": mask, "raw_adv": raw_adv, "weights": weights, "noise": noise}


def _scenario(
    layout: tuple[int, int, int], hf: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]
) -> dict[str, Any]:
    """Run the scenario on the current (initialised) parallel state; returns what this rank saw."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from nemo_gdro.algorithms.dynamo_modulation import (
        DynamoModulationConfig,
        modulation_stats,
    )
    from nemo_gdro.algorithms.losses import PolicyLossConfig, R2VPOConfig
    from nemo_gdro.parallel.rows import DataParallel
    from nemo_gdro.stages.loss import R2VPOLoss
    from nemo_gdro.stages.modulation import DynamoModulation
    from nemo_gdro.trainer.actor import MegatronActor, OptimConfig
    from nemo_gdro.trainer.rl_loss import MinibatchLoss

    spec = _spec()
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    dp_group = parallel_state.get_data_parallel_group()
    rows = slice(dp_rank * B // dp_size, (dp_rank + 1) * B // dp_size)

    # A different init seed per layout: the imported weights must overwrite everything.
    # Adam's first step moves each weight by lr * g / (|g| + eps): with the usual eps = 1e-8 an
    # entry whose gradient is ~1e-9 amplifies its fp32 summation-order noise by lr / eps = 1e5.
    # eps = 1e-4 keeps the update a well-conditioned function of the gradient (lr / eps = 10).
    optim = OptimConfig(lr=1e-3, eps=1e-4, micro_batch_size=MBS, grad_clip=1.0)
    actor = MegatronActor(spec, optim, seed=17 + sum(layout))
    actor.import_hf_state_dict(hf)
    tokens, mask = batch["tokens"][rows], batch["mask"][rows]
    stats = actor.compute_token_stats(tokens)

    modulation = DynamoModulationConfig(scope="minibatch")
    r2vpo = R2VPOConfig(delta=0.001, eta_lam=10.0, lam_init=0.5)
    behaviour = stats["logp"] + batch["noise"][rows]
    advantages = batch["raw_adv"][rows] * batch["weights"][rows]
    mod_stats = modulation_stats(
        advantages[:, None].expand_as(stats["logp"]), stats["logp"], behaviour, stats["entropy"], mask,
        modulation, ebar_exact=stats["ebar"],
    ).reduce(dp_group)
    counts = torch.tensor([mask.sum(), (mask.sum(-1) > 0).sum()], dtype=torch.float64)
    dist.all_reduce(counts, group=dp_group)
    dp = DataParallel(rank=dp_rank, size=dp_size, group=dp_group)
    loss_stage = R2VPOLoss(r2vpo, dp)
    loss_fn = MinibatchLoss(
        policy=PolicyLossConfig(),
        loss=loss_stage,
        loss_context={"lam": loss_stage.dual.lam, "ratio_mean": None},
        modulation=DynamoModulation(modulation, dp),
        modulation_context=mod_stats,
        global_num_tokens=float(counts[0]),
        global_num_seqs=float(counts[1]),
    )
    extras = {
        "response_mask": mask,
        "behaviour_logp": behaviour,
        "advantages": advantages,
        "raw_advantages": batch["raw_adv"][rows],
    }
    # The loss's sums and per-row outputs come back through the actor's one channel, on every stage.
    out = actor.train_step(tokens, extras, loss_fn)
    v_hat = out["r2vpo/sum_sq_dev"] / max(out["tokens"], 1.0)
    lam = loss_stage.after_update(out)["r2vpo/lambda"]
    # Each DP rank holds its own rows' signal: sum the disjoint rows.
    signal = torch.zeros(B, dtype=torch.float64)
    signal[rows] = out.rows["signal"]
    dist.all_reduce(signal, group=dp_group)
    return {
        "rows": (rows.start, rows.stop),
        "stats": {k: v.clone() for k, v in stats.items()},
        "loss": out["loss"],
        "grad_norm": out["grad_norm"],
        "tokens": out["tokens"],
        "v_hat": v_hat,
        "lam": lam,
        "mod_stats": (mod_stats.h_min, mod_stats.h_max, mod_stats.dh_absmax),
        "signal": signal,
        "hf": actor.export_hf_state_dict(),
    }


def _worker(proc: int, work_dir: str) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)  # 4 processes on few cores
    from nemo_gdro.parallel.distributed import destroy_distributed, init_distributed

    hf = torch.load(os.path.join(work_dir, "hf.pt"), weights_only=True)
    batch = torch.load(os.path.join(work_dir, "batch.pt"), weights_only=True)
    for round_index, assignments in enumerate(ROUNDS):
        for layout, first in assignments:
            tp, pp, dp = layout
            size = tp * pp * dp
            if not first <= proc < first + size:
                continue
            rank = proc - first
            os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK="0")
            store = os.path.join(work_dir, f"store_{round_index}_{first}")
            init_distributed(tensor_parallel=tp, pipeline_parallel=pp, seed=0, init_method=f"file://{store}")
            try:
                result = _scenario(layout, hf, batch)
            finally:
                destroy_distributed()
            torch.save(result, os.path.join(work_dir, f"{tp}{pp}{dp}_rank{rank}.pt"))


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[tuple[int, int, int], list[dict[str, Any]]]:
    import torch.multiprocessing as mp

    work_dir: Path = tmp_path_factory.mktemp("layouts")
    spec = _spec()
    torch.save(_hf_weights(spec), work_dir / "hf.pt")
    torch.save(_batch(spec), work_dir / "batch.pt")
    mp.start_processes(_worker, args=(str(work_dir),), nprocs=NPROCS, join=True, start_method="spawn")
    out: dict[tuple[int, int, int], list[dict[str, Any]]] = {}
    for layout in LAYOUTS:
        size = layout[0] * layout[1] * layout[2]
        out[layout] = [
            torch.load(work_dir / f"{layout[0]}{layout[1]}{layout[2]}_rank{r}.pt", weights_only=False)
            for r in range(size)
        ]
    return out


def _close(actual: Any, expected: Any, what: str) -> None:
    torch.testing.assert_close(
        torch.as_tensor(actual, dtype=torch.float64),
        torch.as_tensor(expected, dtype=torch.float64),
        rtol=RTOL,
        atol=ATOL,
        msg=lambda m: f"{what}: {m}",
    )


def test_reference_scenario_is_not_degenerate(results):
    ref = results[(1, 1, 1)][0]
    assert ref["tokens"] == float(_batch(_spec())["mask"].sum())
    assert ref["v_hat"] > 0 and ref["lam"] != 0.5  # the dual variable moved
    assert ref["mod_stats"][0] < ref["mod_stats"][1] and ref["mod_stats"][2] > 0
    assert (ref["signal"] != 0).sum() >= B - 1 and ref["grad_norm"] > 0
    # The step moved every weight by far more than the tolerance (Adam: ~lr = 1e-3 per entry).
    before = _hf_weights(_spec())
    for name, tensor in ref["hf"].items():
        assert (tensor - before[name]).abs().max() > 100 * ATOL, name


@pytest.mark.parametrize("layout", LAYOUTS[1:], ids=lambda t: "tp{}_pp{}_dp{}".format(*t))
def test_layout_matches_reference(results, layout):
    ref = results[(1, 1, 1)][0]
    for rank, got in enumerate(results[layout]):
        where = f"{layout} rank {rank}"
        start, stop = got["rows"]
        for key in ("logp", "entropy", "ebar"):
            _close(got["stats"][key], ref["stats"][key][start:stop], f"{where} {key}")
        for key in ("loss", "grad_norm", "tokens", "v_hat", "lam", "mod_stats", "signal"):
            _close(got[key], ref[key], f"{where} {key}")
        assert got["hf"].keys() == ref["hf"].keys(), where
        for name, tensor in ref["hf"].items():
            _close(got["hf"][name], tensor, f"{where} {name}")
