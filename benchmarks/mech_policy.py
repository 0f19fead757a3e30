"""The frozen policy of a checkpoint, and the rollout / score-gradient cache the mechanism parts read.

``open_policy(checkpoint)`` loads a checkpoint the way ``nemo-gdro eval`` does
(:mod:`nemo_gdro.trainer.eval_run`: the run's own config, the actor WITH its
optimizer state, the rollout engine, the task with its train pool, eval suites
and verifier, the pass-rate store, the classifier and the stages) and pushes the
actor's weights to the engine, as the trainer does after every step.

:class:`FrozenPolicy` then
- generates ``K`` rollouts per prompt with the real engine and scores them with the
  real verifier (:meth:`FrozenPolicy.rollouts`);
- computes each rollout's score gradient ``g = sum_t grad log pi(y_t | ...)`` over
  its response tokens, w.r.t. every parameter of the actor's Megatron module
  (:meth:`FrozenPolicy.score_gradients`): one forward and backward per rollout
  (``torch.func`` cannot transform Megatron's linear layers, whose
  ``autograd.Function`` has no ``setup_context``; a batched forward with one
  backward per row measured 2.5x slower than a forward per row);
- reads Adam's diagonal preconditioner ``D = 1 / (sqrt(v_hat) + eps)`` from the
  checkpoint's optimizer state (:meth:`FrozenPolicy.adam_preconditioner`).

Gradients are kept as a seeded count sketch (:class:`CountSketch`: one hash
bucket and one random sign per parameter entry, O(params) memory; inner
products are preserved in expectation) and, exactly, as their inner products
with a few full-size vectors (the held-out band gradients, plain and
preconditioned), which is all M2 needs.

:func:`build_cache` puts it together for one checkpoint: the eval prompts first
(held-out band gradients), then the train pool (per-rollout sketches, exact
inner products, rewards, token counts), the pass-rate store and the config the
allocators need; saved with ``torch.save`` under the work directory, keyed by
the checkpoint's manifest and the settings, so the parts re-run in seconds.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CacheSettings",
    "CountSketch",
    "FrozenPolicy",
    "build_cache",
    "checkpoint_dir",
    "loo_weights",
    "open_policy",
]

#: Sampling seeds of the mechanism rollouts: their own (seed, step) stream, far from training and evaluation.
MECH_STEP_OFFSET = 2_000_000_000
#: Cache format version (bump when the layout of the saved dict changes).
CACHE_VERSION = 2


# ----------------------------------------------------------------- checkpoints
def checkpoint_dir(run_dir: Path, step: int) -> Path:
    """``run_dir/checkpoints/step_XXXXXXXX`` of ``step``; a clear error lists the steps there."""
    from nemo_gdro.trainer.checkpoint import step_dir_name

    root = Path(run_dir) / "checkpoints"
    path = root / step_dir_name(step)
    if not (path / "manifest.json").is_file():
        have = sorted(p.name for p in root.glob("step_*")) if root.is_dir() else []
        raise FileNotFoundError(
            f"no complete checkpoint of step {step} at {path} (checkpoints there: {', '.join(have[-8:]) or 'none'})"
        )
    return path


def available_steps(run_dir: Path) -> list[int]:
    """Steps that have a complete checkpoint under ``run_dir/checkpoints``."""
    root = Path(run_dir) / "checkpoints"
    out = []
    for p in root.glob("step_*") if root.is_dir() else []:
        if (p / "manifest.json").is_file():
            out.append(int(p.name.split("_")[1]))
    return sorted(out)


# ------------------------------------------------------------------ the sketch
class CountSketch:
    """A linear map ``R^n -> R^d``: entry ``k`` of a vector is added, times ``sign[k]``, to bucket ``bucket[k]``.

    ``E <S x, S y> = <x, y>`` over the seeded hash (each cross term has a random sign
    that averages out), with a relative error of order ``sqrt(2 / d)``;
    ``S`` is linear, so sketches of sums are sums of sketches.
    """

    def __init__(self, num_entries: int, dim: int, seed: int) -> None:
        if dim < 1:
            raise ValueError(f"sketch dim must be >= 1, got {dim}")
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + 17)
        self.dim = int(dim)
        self.num_entries = int(num_entries)
        self.bucket = torch.randint(0, dim, (num_entries,), generator=g, dtype=torch.int64)
        self.sign = torch.randint(0, 2, (num_entries,), generator=g).to(torch.float32).mul_(2).sub_(1)

    def __call__(self, flat: torch.Tensor) -> torch.Tensor:
        """``flat [n]`` (float) -> ``[d]`` float32."""
        if flat.shape != (self.num_entries,):
            raise ValueError(f"expected a [{self.num_entries}] vector, got {tuple(flat.shape)}")
        out = torch.zeros(self.dim, dtype=torch.float32)
        return out.index_add_(0, self.bucket, flat.to(torch.float32) * self.sign)


# ------------------------------------------------------------- the frozen policy
@dataclass
class Rollouts:
    """``K`` rollouts of each of ``N`` prompts, rows grouped by prompt (row ``i*K + j``)."""

    prompt_ids: torch.Tensor  # int64 [N] dataset ids (of the split they come from)
    rewards: torch.Tensor  # float32 [N, K] shaped rewards (what the advantages see)
    correct: torch.Tensor  # bool [N, K] the verifier's verdicts
    tokens: torch.Tensor  # int64 [N, K] response tokens of each rollout (the loss's token count)
    truncated: torch.Tensor  # bool [N, K] hit max_new_tokens without a stop token
    batch: Any  # the RolloutBatch (tokens, masks) the gradients are taken on


class FrozenPolicy:
    """A loaded checkpoint: components (actor with optimizer state, engine, task, store, classifier, stages)."""

    def __init__(self, components: Any, cfg: Any, checkpoint: Path, step: int) -> None:
        self.c = components
        self.cfg = cfg
        self.checkpoint = checkpoint
        self.step = step
        self.module = components.actor.module
        self.params = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]
        self.num_params = sum(p.numel() for _, p in self.params)

    # ---------------------------------------------------------------- rollouts
    def rollouts(self, records: Sequence[Any], k: int, seed: int, verifier: Any | None = None) -> Rollouts:
        """``k`` rollouts of every record with the run's engine (training sampling settings), verified.

        Rewards are formed as the step forms them (the verifier's rewards, plus the
        overlong penalty when the run shapes rewards with it).
        """
        from nemo_gdro.rewards.shaping import overlong_penalty
        from nemo_gdro.rollout.seeds import prompt_seeds

        ids = torch.tensor([r.prompt_id for r in records], dtype=torch.int64)
        n = torch.full((len(records),), int(k), dtype=torch.int64)
        seeds = prompt_seeds(int(seed), MECH_STEP_OFFSET + int(self.step), ids)
        batch = self.c.engine.generate(list(records), n, seeds)
        verifier = verifier or self.c.task.verifier
        result = verifier.verify_batch(batch.responses, batch.answers)
        rewards = verifier.rewards(result).to(torch.float32)
        over = self.cfg.reward.overlong_config
        if over.enabled:
            rewards = rewards + overlong_penalty(
                batch.response_lengths, self.cfg.rollout.max_new_tokens, over.buffer_tokens, over.penalty
            )
        truncated = (
            batch.truncated if batch.truncated is not None
            else batch.response_lengths >= self.cfg.rollout.max_new_tokens
        ).to(torch.bool)
        shape = (len(records), int(k))
        return Rollouts(
            prompt_ids=ids,
            rewards=rewards.reshape(shape),
            correct=result.correct.to(torch.bool).reshape(shape),
            tokens=batch.response_mask.sum(-1).to(torch.int64).reshape(shape),
            truncated=truncated.reshape(shape),
            batch=batch,
        )

    # --------------------------------------------------------------- gradients
    def _row_logp(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Sum of the response tokens' log-probs of one row ``tokens [1, S]`` (temperature as the actor's)."""
        pos = torch.arange(tokens.shape[1]).unsqueeze(0)
        logits = self.module(tokens, pos, None)  # [1, S, V] (tensor parallel 1)
        lp = torch.log_softmax(logits[:, :-1].float() / self.c.actor.temperature, -1)
        lp = lp.gather(-1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1)
        return (lp * mask).sum()

    def score_gradients(self, batch: Any, rows: Sequence[int] | None = None) -> Iterator[torch.Tensor]:
        """Flat ``grad sum_t log pi(y_t)`` (float32 ``[num_params]``) of each row, in order.

        The rows are trimmed to their own length (no padding positions are computed).
        A row whose loss the run masks (``reward.mask_truncated`` and truncated) still
        gets its gradient; the callers weight it.
        """
        if self.c.dp.size != 1 or self.c.model_parallel != 1:
            raise RuntimeError("the mechanism benchmark runs on one process (no DP / TP / PP)")
        params = [p for _, p in self.params]
        self.module.eval()  # no dropout: the score of the policy that sampled
        lengths = batch.sequence_lengths
        idx = range(batch.num_rows) if rows is None else rows
        for r in idx:
            width = int(lengths[r])
            tok = batch.tokens[r : r + 1, :width]
            mask = batch.response_mask[r : r + 1, : width - 1].to(torch.float32)
            grads = torch.autograd.grad(self._row_logp(tok, mask), params, allow_unused=True)
            yield torch.cat([
                (g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)
            ])

    def token_logp_check(self, batch: Any, rows: int = 4) -> float:
        """Largest difference of the per-row log-prob sums here and in the actor's own loss pass (should be ~0)."""
        take = torch.arange(min(rows, batch.num_rows))
        stats = self.c.actor.compute_token_stats(batch.tokens[take], lengths=batch.sequence_lengths[take])
        ref = (stats["logp"] * batch.response_mask[take]).sum(-1)
        with torch.no_grad():
            mine = torch.stack([
                self._row_logp(batch.tokens[r : r + 1, : int(batch.sequence_lengths[r])],
                               batch.response_mask[r : r + 1, : int(batch.sequence_lengths[r]) - 1].float())
                for r in take.tolist()
            ])
        return float((mine - ref).abs().max())

    # ----------------------------------------------------------- the optimizer
    def adam_preconditioner(self) -> torch.Tensor | None:
        """Flat ``1 / (sqrt(v / (1 - beta2^t)) + eps)`` (float32 ``[num_params]``), None before Adam's first step.

        ``v`` and ``t`` are the checkpoint's AdamW state of each parameter (the
        plain Megatron optimizer holds the model parameters themselves).
        """
        actor = self.c.actor
        if actor.megatron.distributed_optimizer:
            raise RuntimeError("adam_preconditioner: the distributed optimizer's sharded state is not supported here")
        beta2, eps = float(self.cfg.optim.betas[1]), float(self.cfg.optim.eps)
        states: dict[int, Any] = {}
        for opt in actor._megatron_optimizers():
            for p, st in opt.optimizer.state.items():
                states[id(p)] = st
        parts = []
        for name, p in self.params:
            st = states.get(id(p))
            if st is None or "exp_avg_sq" not in st:
                return None
            t = float(st["step"])
            v_hat = st["exp_avg_sq"].to(torch.float64) / (1.0 - beta2**t)
            parts.append((1.0 / (v_hat.sqrt() + eps)).reshape(-1).to(torch.float32))
        return torch.cat(parts)


@contextlib.contextmanager
def open_policy(checkpoint: Path, log=print) -> Iterator[FrozenPolicy]:
    """Load ``checkpoint`` (a ``step_XXXXXXXX`` dir) like ``nemo-gdro eval`` and push its weights to the engine.

    A checkpoint written before config keys were renamed or added is read with today's keys
    (:func:`nemo_gdro.trainer.config_upgrade.upgrade_saved_config`, one ``log`` line names them).
    """
    from nemo_gdro.trainer import eval_run

    cfg, ckpt = eval_run._config_for(Path(checkpoint), [], "train", log=lambda line: log(f"[mech] {line}"))
    assert ckpt is not None
    with eval_run._components(cfg) as components:
        step = eval_run._load(components, ckpt)
        components.engine.load_weights(components.actor.export_hf_state_dict(), version=step)
        yield FrozenPolicy(components, cfg, ckpt, step)


# ----------------------------------------------------------------- objectives
def loo_weights(rewards: torch.Tensor) -> torch.Tensor:
    """Leave-one-out policy-gradient weights ``[N, K]`` of the objective "mean over prompts of expected reward".

    ``sum_ij w_ij g_ij`` with ``w_ij = (r_ij - mean_{k != j} r_ik) / (K N)`` is an
    unbiased estimate of its gradient (the baseline of a rollout does not use
    the rollout itself); it is ``K / (K - 1)`` times the mean-centred (Dr.GRPO)
    weight, and zero for a group whose rewards are all equal.
    """
    n, k = rewards.shape
    if k < 2:
        raise ValueError("the leave-one-out baseline needs at least 2 rollouts per prompt")
    r = rewards.to(torch.float64)
    loo_mean = (r.sum(1, keepdim=True) - r) / (k - 1)
    return (r - loo_mean) / (k * n)


# ---------------------------------------------------------------------- cache
@dataclass(frozen=True)
class CacheSettings:
    """What a cache is made of (its key, with the checkpoint's manifest)."""

    train_prompts: int | None = None  # None: the whole pool
    train_k: int = 64
    eval_prompts: int = 256
    eval_k: int = 16
    sketch_dim: int = 16384
    seed: int = 0


def _cache_path(work: Path, checkpoint: Path, settings: CacheSettings) -> Path:
    manifest = (checkpoint / "manifest.json").read_bytes()
    key = hashlib.sha256(
        manifest + json.dumps({**asdict(settings), "v": CACHE_VERSION}, sort_keys=True).encode()
    ).hexdigest()[:12]
    return work / "mech_cache" / f"{checkpoint.parent.parent.name}-{checkpoint.name}-{key}.pt"


def _bands(records: Sequence[Any], rollouts: Rollouts) -> tuple[torch.Tensor, list[str]]:
    """Band of every eval prompt: the task's difficulty level where records carry one, else pass-rate terciles."""
    levels = [r.meta.get("difficulty") for r in records]
    if all(v is not None for v in levels):
        values = sorted({int(v) for v in levels})
        index = {v: i for i, v in enumerate(values)}
        return torch.tensor([index[int(v)] for v in levels], dtype=torch.int64), [f"level_{v}" for v in values]
    p = rollouts.correct.double().mean(1)
    band = torch.bucketize(p, torch.tensor([1 / 3, 2 / 3], dtype=torch.float64), right=True)
    return band, ["pass<1/3", "pass 1/3-2/3", "pass>=2/3"]


def build_cache(checkpoint: Path, work: Path, settings: CacheSettings, log=print) -> dict[str, Any]:
    """The rollout / gradient cache of ``checkpoint`` (loaded from ``work/mech_cache`` when it exists)."""
    path = _cache_path(work, checkpoint, settings)
    if path.is_file():
        log(f"[mech] cache {path.name}: reused")
        return torch.load(path, weights_only=True)
    t0 = time.perf_counter()
    with open_policy(checkpoint, log) as pol:
        cache = _compute(pol, settings, log)
    cache["wall_s"] = time.perf_counter() - t0
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(cache, tmp)
    tmp.replace(path)
    log(f"[mech] cache {path.name}: written ({cache['wall_s']:.0f} s)")
    return cache


def _compute(pol: FrozenPolicy, s: CacheSettings, log) -> dict[str, Any]:
    from omegaconf import OmegaConf

    c = pol.c
    sketch = CountSketch(pol.num_params, s.sketch_dim, s.seed)
    precond = pol.adam_preconditioner()

    # ---- held-out: per-band gradients of "mean expected reward" (leave-one-out weights, exact, full size)
    suites = list(c.task.eval_suites.values())
    records = [rec for suite in suites for rec in suite.dataset][: s.eval_prompts]
    verifier = suites[0].verifier
    t = time.perf_counter()
    ev = pol.rollouts(records, s.eval_k, s.seed + 1, verifier)
    band, band_names = _bands(records, ev)
    w_eval = loo_weights(ev.rewards) * len(records)  # per-prompt mean weights: divide by the band size below
    nb = len(band_names)
    band_size = torch.bincount(band, minlength=nb).to(torch.float64)
    h = torch.zeros(nb, pol.num_params, dtype=torch.float64)
    rows = [(i * s.eval_k + j, i, j) for i in range(len(records)) for j in range(s.eval_k) if w_eval[i, j] != 0]
    for (row, i, j), g in zip(rows, pol.score_gradients(ev.batch, [r for r, _, _ in rows])):
        h[band[i]] += (w_eval[i, j] / band_size[band[i]]) * g.double()
    share = band_size / band_size.sum()
    h_all = (share[:, None] * h).sum(0)
    vectors = torch.cat([h, h_all[None]], 0)  # [nb + 1, n]: bands, then the whole held-out objective
    names = [*band_names, "all"]
    log(f"[mech] held-out: {len(records)} prompts x {s.eval_k} rollouts, {len(rows)} informative rows "
        f"({time.perf_counter() - t:.0f} s)")

    # ---- train pool: K rollouts per prompt; per rollout its sketch and exact inner products
    pool = c.task.train
    n_train = len(pool) if s.train_prompts is None else min(s.train_prompts, len(pool))
    train_records = pool.get_many(torch.arange(n_train))
    t = time.perf_counter()
    tr = pol.rollouts(train_records, s.train_k, s.seed)
    t_gen = time.perf_counter() - t
    vec32 = vectors.to(torch.float32)
    pre32 = (vectors * precond.double()).to(torch.float32) if precond is not None else None
    R = n_train * s.train_k
    sk = torch.zeros(R, s.sketch_dim, dtype=torch.float32)
    dots = torch.zeros(R, len(names), dtype=torch.float64)
    dots_pre = torch.full((R, len(names)), math.nan, dtype=torch.float64)
    t = time.perf_counter()
    for r, g in enumerate(pol.score_gradients(tr.batch)):
        sk[r] = sketch(g)
        dots[r] = (vec32 @ g).double()
        if pre32 is not None:
            dots_pre[r] = (pre32 @ g).double()
        if r and r % 2048 == 0:
            log(f"[mech]   {r}/{R} train rollouts ({(time.perf_counter() - t) / r * 1e3:.1f} ms each)")
    t_grad = time.perf_counter() - t
    log(f"[mech] train pool: {n_train} prompts x {s.train_k} rollouts (generation {t_gen:.0f} s, "
        f"gradients {t_grad:.0f} s, {t_grad / R * 1e3:.1f} ms per rollout)")

    # ---- what the allocators read: the store, the classifier's bins of the pool, the run's algorithm section
    store_state = c.store.state_dict()
    bins = c.classifier.classify(torch.arange(len(pool)))
    stats = {
        "rollouts": c.store.counters(torch.arange(len(pool)))[0],
        "correct": c.store.counters(torch.arange(len(pool)))[1],
    }
    algorithm = OmegaConf.to_container(pol.cfg.tree.algorithm, resolve=True)
    # Controller state of a run that had them (a GRPO run has neither): the parts start from it.
    controllers = {k: v.state_dict() for k, v in c.stages.stateful().items() if k in ("prompt_gdro", "rollout_gdro")}
    return {
        "version": CACHE_VERSION,
        "settings": asdict(s),
        "checkpoint": str(pol.checkpoint),
        "step": pol.step,
        "num_params": pol.num_params,
        "logp_check": pol.token_logp_check(tr.batch),
        # train pool [N, K] (+ per-rollout [N*K, ...])
        "train_ids": tr.prompt_ids,
        "train_rewards": tr.rewards,
        "train_correct": tr.correct,
        "train_tokens": tr.tokens,
        "train_truncated": tr.truncated,
        "train_level": torch.tensor([int(r.meta.get("difficulty", -1)) for r in train_records], dtype=torch.int64),
        "train_sketch": sk,
        "train_dots": dots,
        "train_dots_adam": dots_pre,
        "dot_names": names,
        # held-out
        "eval_ids": ev.prompt_ids,
        "eval_rewards": ev.rewards,
        "eval_band": band,
        "band_names": band_names,
        "heldout_sketch": torch.stack([sketch(v.to(torch.float32)) for v in vectors]),
        "heldout_norm": vectors.norm(dim=1),
        "heldout_adam_norm": (vectors * precond.double().sqrt()).norm(dim=1) if precond is not None else None,
        "has_adam": precond is not None,
        # allocator inputs
        "store_state": store_state,
        "pool_bins": bins,
        "pool_stats": stats,
        "pool_size": len(pool),
        "algorithm": algorithm,
        "controllers": controllers,
        "n_bar": int(pol.cfg.rollout.n),
        "prompts_per_step": int(pol.cfg.trainer.prompts_per_step),
        "seed": int(pol.cfg.seed),
        "lr": float(pol.cfg.optim.lr),
        "betas": list(pol.cfg.optim.betas),
        "grad_clip": float(pol.cfg.optim.grad_clip),
        "mask_truncated": bool(pol.cfg.reward.mask_truncated),
        "reward_range": list(c.task.verifier.reward_range),
        "gen_s": t_gen,
        "grad_ms_per_rollout": t_grad / R * 1e3,
    }
