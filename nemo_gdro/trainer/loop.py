"""The training run: SFT warm start, then the RL step loop of design.md.

One RL step::

    sample prompts -> classify (history up to t-1) -> allocate n_i -> generate
    -> verify -> GRPO advantages x Prompt-GDRO weights -> behaviour log-probs
    (recomputed by the actor) -> [+ replayed groups] -> mini-batches:
    optimizer steps (clipped | R²VPO loss, DynaMO token modulation)
    -> weights to the rollout engine -> controllers observe -> metrics, eval,
    atomic checkpoint.

Every decision is a deterministic function of the config seed, the step and
the checkpointed state, so a resumed run repeats the uninterrupted one.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from nemo_gdro.algorithms.advantages import (
    grpo_advantages,
    pass_at_k,
    zero_variance_group_fraction,
)
from nemo_gdro.algorithms.bin_index import BinIndex
from nemo_gdro.algorithms.difficulty import DifficultyClassifier
from nemo_gdro.algorithms.dynamo_allocation import DynamoAllocator
from nemo_gdro.algorithms.dynamo_modulation import ModulationStats, modulation_stats
from nemo_gdro.algorithms.losses import DualVariableController
from nemo_gdro.algorithms.prompt_gdro import (
    PromptGDRO,
    failure_signal,
    learnability_signal,
)
from nemo_gdro.algorithms.rollout_gdro import RolloutGDRO
from nemo_gdro.algorithms.segments import segment_sum
from nemo_gdro.algorithms.stats import group_outcomes
from nemo_gdro.parallel.sharded_stats import ShardedPromptStats, checksum
from nemo_gdro.trainer.config import AlgorithmSetup, ConfigError, validate
from nemo_gdro.trainer.replay import ReplayBuffer
from nemo_gdro.trainer.rl_loss import MinibatchLoss
from nemo_gdro.trainer.sampler import EpochSampler

EVAL_STEP_OFFSET = 1_000_000_000  # eval draws use their own (seed, step) stream


@dataclass
class RunResult:
    output_dir: Path
    steps_done: int
    final_eval: dict[str, float]
    sft_eval: dict[str, float]


class Trainer:
    """Owns every component of a run; ``run()`` trains to ``trainer.max_steps``."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.setup: AlgorithmSetup = validate(cfg)
        self.output_dir = Path(cfg.run.output_dir).resolve()
        self.seed = int(cfg.run.seed)
        self._build()

    # ------------------------------------------------------------------ building
    def _build(self) -> None:
        from nemo_gdro.data.dataset import arithmetic_dataset
        from nemo_gdro.data.tokenizer import CharTokenizer
        from nemo_gdro.models.gpt import spec_from_overrides
        from nemo_gdro.models.hf_mapping import hf_config
        from nemo_gdro.parallel.distributed import init_distributed
        from nemo_gdro.rewards.arithmetic import ArithmeticVerifier
        from nemo_gdro.rollout.hf_engine import HFRolloutEngine, SamplingConfig
        from nemo_gdro.trainer.actor import MegatronActor, OptimConfig
        from nemo_gdro.trainer.checkpoint import CheckpointManager

        cfg, setup = self.cfg, self.setup
        self.dist = init_distributed(
            tensor_parallel=int(cfg.parallel.tensor_parallel),
            pipeline_parallel=int(cfg.parallel.pipeline_parallel),
            seed=self.seed,
        )
        from megatron.core import parallel_state

        # Controllers are replicated; per-prompt history is sharded over DP ranks;
        # each DP rank generates and trains its slice of the step's prompts.
        self.dp_group = parallel_state.get_data_parallel_group()
        self.dp_size, self.dp_rank = self.dist.data_parallel, self.dist.dp_rank
        self.model_parallel = self.dist.tensor_parallel * self.dist.pipeline_parallel
        self.is_main = self.dist.rank == 0
        self.tokenizer = CharTokenizer()
        self.train_ds, self.eval_ds = arithmetic_dataset(int(cfg.data.num_train), int(cfg.data.num_eval), int(cfg.data.seed))
        overrides = OmegaConf.to_container(cfg.model.overrides, resolve=True) or {}
        overrides.setdefault("vocab_size", self.tokenizer.padded_vocab_size())
        self.spec = spec_from_overrides(cfg.model.preset, **overrides)
        o = cfg.optim
        self.optim = OptimConfig(
            lr=float(o.lr), weight_decay=float(o.weight_decay), betas=tuple(o.betas), eps=float(o.eps),
            grad_clip=float(o.grad_clip), warmup_steps=int(o.warmup_steps),
            micro_batch_size=int(cfg.trainer.micro_batch_size),
        )
        s = cfg.sft
        self.sft_optim = OptimConfig(
            lr=float(s.lr), weight_decay=float(s.weight_decay), betas=tuple(o.betas), eps=float(o.eps),
            grad_clip=float(o.grad_clip), warmup_steps=int(s.warmup_steps),
            micro_batch_size=int(cfg.trainer.micro_batch_size),
        )
        self.actor = MegatronActor(self.spec, self.sft_optim, seed=self.seed, temperature=float(cfg.rollout.temperature))
        self.reference = None  # built after SFT when kl_coef > 0
        r = cfg.rollout
        self.train_sampling = SamplingConfig(
            temperature=float(r.temperature), top_p=float(r.top_p), top_k=int(r.top_k), max_new_tokens=int(r.max_new_tokens)
        )
        e = cfg.eval
        self.eval_sampling = SamplingConfig(
            temperature=float(e.temperature), top_p=float(e.top_p), top_k=int(e.top_k), max_new_tokens=int(r.max_new_tokens)
        )
        self.hf_config = hf_config(self.spec)
        # Each DP rank samples its own prompts with its own stream (TP/PP peers share it).
        self.engine = HFRolloutEngine(
            self.hf_config, self.tokenizer, self.train_sampling, seed=self.seed + 1_000_003 * self.dp_rank
        )
        self.eval_engine = HFRolloutEngine(self.hf_config, self.tokenizer, self.eval_sampling, seed=self.seed + 1)
        self.verifier = ArithmeticVerifier()

        num_prompts = len(self.train_ds)
        self.store = ShardedPromptStats(
            num_prompts, setup.stats, group=self.dp_group,
            gather_capacity=-(-int(cfg.trainer.prompts_per_step) // self.dp_size),
        )
        self.classifier = DifficultyClassifier(setup.difficulty, self.store)
        nb = self.classifier.num_bins
        self.prompt_gdro = PromptGDRO(setup.prompt_gdro, nb, seed=self.seed) if setup.prompt_gdro else None
        self.bin_index = (
            BinIndex(num_prompts, nb, setup.difficulty.unseen_bin_index) if setup.sampler == "prompt_gdro" else None
        )
        self.rollout_gdro = RolloutGDRO(setup.rollout_gdro, nb, self.store) if setup.rollout_gdro else None
        self.dynamo = DynamoAllocator(setup.dynamo_allocation, self.store) if setup.dynamo_allocation else None
        self.dual = DualVariableController(setup.r2vpo) if setup.r2vpo else None
        self.replay = (
            ReplayBuffer(setup.r2vpo.staleness, self.seed) if setup.r2vpo and setup.r2vpo.replay_ratio > 0 else None
        )
        self.sampler = EpochSampler(num_prompts, self.seed)
        self.checkpoints = CheckpointManager(
            self.output_dir / "checkpoints",
            keep_last=int(cfg.trainer.keep_last_checkpoints),
            rank=self.dist.rank,
            world_size=self.dist.world_size,
        )
        self.step = 0
        self.sft_done = False
        self.sft_eval: dict[str, float] = {}
        self.last_eval: dict[str, float] = {}

    # --------------------------------------------------------------- controllers
    def controller_state(self, include_store: bool = True) -> dict[str, Any]:
        """Every controller's state; the per-prompt store (this rank's shard) on request.

        In checkpoints the store is saved per rank and the rest once.
        """
        state: dict[str, Any] = {
            "classifier": self.classifier.state_dict(),
            "sampler": self.sampler.state_dict(),
        }
        for name in ("prompt_gdro", "bin_index", "rollout_gdro", "dynamo", "dual", "replay"):
            obj = getattr(self, name)
            if obj is not None:
                state[name] = obj.state_dict()
        if include_store:
            state["store"] = self.store.state_dict()
        return state

    def load_controller_state(self, state: dict[str, Any]) -> None:
        """Load the replicated controllers (the store is loaded from its shards)."""
        self.classifier.load_state_dict(state["classifier"])
        self.sampler.load_state_dict(state["sampler"])
        for name in ("prompt_gdro", "bin_index", "rollout_gdro", "dynamo", "dual", "replay"):
            obj = getattr(self, name)
            if obj is None:
                continue
            if name not in state:
                raise ConfigError(
                    f"checkpoint has no state for {name}, which this run enables: resume with the config the "
                    "checkpoint was written with, or start a new run (run.output_dir)"
                )
            obj.load_state_dict(state[name])

    # ------------------------------------------------------------------- SFT
    def sft(self) -> dict[str, float]:
        """Next-token training on worked examples (prompt tokens masked out)."""
        cfg = self.cfg.sft
        steps, batch_size = int(cfg.steps), int(cfg.batch_size)
        gen = torch.Generator().manual_seed(self.seed + 17)
        last = {}
        for step in range(steps):
            ids = torch.randint(0, len(self.train_ds), (batch_size,), generator=gen).tolist()
            tokens, mask = self._sft_batch(self.train_ds.get_many(ids))
            # Every rank builds the same batch; each trains its DP slice, normalised
            # by the whole batch's token count (DDP sums the gradients).
            count = float(mask.sum())
            tokens, mask = tokens[self.dp_rank :: self.dp_size], mask[self.dp_rank :: self.dp_size]

            def loss_fn(stats, extras, count=count):
                m = extras["response_mask"]
                return -(stats["logp"] * m).sum() / count, {}

            last = self.actor.train_step(tokens, {"response_mask": mask.to(torch.float32)}, loss_fn)
        return {"sft/loss": float(last.get("loss", math.nan)), "sft/steps": float(steps)}

    def _sft_batch(self, records) -> tuple[torch.Tensor, torch.Tensor]:
        tok = self.tokenizer
        seqs, prompt_lens = [], []
        for rec in records:
            prompt = tok.encode(rec.prompt, add_bos=True)
            target = tok.encode(rec.meta["sft_target"], add_eos=True)
            seqs.append(prompt + target)
            prompt_lens.append(len(prompt))
        width = max(len(s) for s in seqs)
        tokens = torch.full((len(seqs), width), tok.pad_id, dtype=torch.int64)
        mask = torch.zeros(len(seqs), width - 1, dtype=torch.bool)
        for i, (s, p) in enumerate(zip(seqs, prompt_lens)):
            tokens[i, : len(s)] = torch.tensor(s)
            mask[i, p - 1 : len(s) - 1] = True  # positions predicting the target tokens
        return tokens, mask

    # ------------------------------------------------------------------ eval
    def evaluate(self, step: int) -> dict[str, float]:
        """Held-out mean@k, unbiased pass@1 / pass@k, overall and per difficulty level."""
        k = int(self.cfg.eval.k)
        # Always evaluate the policy as it is now, never a stale copy.
        self.eval_engine.load_weights(self.actor.export_hf_state_dict(), version=max(step, 0))
        records = [self.eval_ds[i] for i in range(len(self.eval_ds))]
        n = torch.full((len(records),), k, dtype=torch.int64)
        batch = self.eval_engine.generate(records, n, step=EVAL_STEP_OFFSET + step)
        rewards = self.verifier.score_batch(batch.responses, batch.answers)
        correct = segment_sum((rewards > 0.5).to(torch.int64), batch.group_index, len(records))
        p1 = pass_at_k(n, correct, 1)
        pk = pass_at_k(n, correct, k)
        out = {"eval/mean@k": float(p1.mean()), "eval/pass@1": float(p1.mean()), f"eval/pass@{k}": float(pk.mean())}
        levels = torch.tensor([int(r.meta.get("difficulty", 0)) for r in records])
        for level in sorted(set(levels.tolist())):
            sel = levels == level
            out[f"eval/pass@1/band_{level}"] = float(p1[sel].mean())
            out[f"eval/pass@{k}/band_{level}"] = float(pk[sel].mean())
        return out

    # -------------------------------------------------------------- one step
    def _allocate(self, ids: torch.Tensor, bins: torch.Tensor):
        n_bar = int(self.cfg.rollout.n)
        if self.rollout_gdro is not None:
            plan = self.rollout_gdro.allocate(ids, bins)
            return plan.counts, plan
        if self.dynamo is not None:
            alloc = self.dynamo.allocate(ids)
            return alloc.counts, alloc
        return torch.full((ids.numel(),), n_bar, dtype=torch.int64), None

    def rl_step(self, step: int) -> dict[str, float]:
        setup, cfg = self.setup, self.cfg
        num = int(cfg.trainer.prompts_per_step)
        t0 = time.perf_counter()

        # 1. prompts, bins (from history up to the previous step), rollouts per prompt.
        q = None
        if self.bin_index is not None:
            ids, _, q = self.prompt_gdro.sample_prompts(self.bin_index, num)
            new_epoch = False
        else:
            ids, new_epoch = self.sampler.next(num)
        if new_epoch and self.dynamo is not None and setup.dynamo_allocation.refresh == "every_epoch":
            self.dynamo.refresh_epoch()
        bins = self.classifier.classify(ids)
        counts, plan = self._allocate(ids, bins)

        # 2. generation and rewards for this DP rank's slice of the prompts.
        mine = torch.arange(num)[self.dp_rank :: self.dp_size]
        records = self.train_ds.get_many(ids[mine])
        batch = self.engine.generate(records, counts[mine], step=step)
        t_gen = time.perf_counter()
        rewards = self.verifier.score_batch(batch.responses, batch.answers).to(torch.float32)
        batch.rewards = rewards
        gi = batch.group_index
        # Global rows in canonical order (prompt position, then rollout index):
        # known on every rank from the replicated allocation, so that per-row
        # statistics of all ranks meet with one all-reduce, whatever the layout.
        canon = self._canonical_rows(mine[gi], counts)
        gi_global = torch.arange(num).repeat_interleave(counts)
        response_bins = bins[gi_global]
        rewards_global = self._scatter_rows(rewards.double(), canon, gi_global.numel()).float()

        # 3. advantages (each prompt's rows live on one rank) and per-response weights.
        raw_adv = grpo_advantages(rewards, gi, mine.numel(), setup.advantage)
        weights_global = torch.ones(gi_global.numel(), dtype=torch.float64)
        w_bin = None
        if setup.advantage_weighting == "prompt_gdro":
            weights_global, w_bin = self.prompt_gdro.response_weights(response_bins)
        if setup.sampler == "prompt_gdro" and setup.prompt_gdro.importance_correct:
            weights_global = weights_global * self.prompt_gdro.importance_weights(response_bins, q, self.bin_index)
        batch.advantages = (raw_adv.double() * weights_global[canon]).to(torch.float32)

        # 4. behaviour log-probs, recomputed by the actor (never taken from the engine).
        stats = self.actor.compute_token_stats(batch.tokens)
        batch.behaviour_logp = stats["logp"].detach()
        fresh_rows = batch.num_rows
        raw_all = raw_adv
        train_batch = batch
        if self.replay is not None:
            self.replay.evict(step)
            n_replay = int(round(setup.r2vpo.replay_ratio * mine.numel()))
            groups = self.replay.sample(n_replay, step * self.dp_size + self.dp_rank)
            if groups:
                train_batch = type(batch).concat([batch] + [g.rows for g in groups])
                raw_all = torch.cat([raw_adv] + [g.rows.advantages.float() for g in groups])
            self.replay.add(batch, version=step)

        # 5. optimizer steps over shuffled mini-batches.
        signal = torch.full((train_batch.num_rows + 1,), math.nan, dtype=torch.float64)
        actor_metrics = self._train_minibatches(train_batch, raw_all, signal, step, canon, gi_global.numel())
        signal = self._share_signal_across_stages(signal)
        t_train = time.perf_counter()

        # 6. new weights to the engine; controllers learn from this step's (fresh) rows.
        self.engine.load_weights(self.actor.export_hf_state_dict(), version=step + 1)
        p_rollouts, p_correct = group_outcomes(rewards, gi, mine.numel(), setup.difficulty.correct_threshold)
        self.store.observe(ids[mine], p_rollouts, p_correct)
        correct_global = torch.zeros(num, dtype=torch.float64)
        correct_global[mine] = p_correct.double()
        correct_global = self._all_reduce(correct_global)
        surrogate_global = self._scatter_rows(signal[:fresh_rows], canon, gi_global.numel())
        loss_signal = self._loss_signal(surrogate_global, rewards_global, gi_global, num)
        if self.prompt_gdro is not None:
            self.prompt_gdro.observe(response_bins, loss_signal)
        if self.rollout_gdro is not None:
            self.rollout_gdro.observe(response_bins, loss_signal, plan, bins, group_index=gi_global)
        if self.bin_index is not None:
            # Refresh the sampler's bin membership of the prompts just observed.
            self.bin_index.move(ids, self.classifier.classify(ids))
        if self.dp_size > 1:
            # Replicated decisions must agree on every rank; fail loudly if not.
            replicated = {"bins": bins, "counts": counts}
            for name in ("prompt_gdro", "rollout_gdro", "dual"):
                if getattr(self, name) is not None:
                    replicated[name] = getattr(self, name).state_dict()
            replicated.get("prompt_gdro", {}).pop("rng", None)
            checksum(replicated, group=self.dp_group, step=step)

        # Kept for inspection (tests, debugging); replaced every step.
        self.last_batch = batch
        self.last_bins = bins

        # 7. metrics (global over DP ranks).
        local_tokens = float(batch.response_mask.sum())
        metrics = {
            "train/reward_mean": float(rewards_global.mean()),
            "train/pass_rate": float((correct_global > 0).double().mean()),
            "train/zero_variance_groups": zero_variance_group_fraction(rewards_global, gi_global, num),
            "train/rollouts": float(counts.sum()),
            "train/response_tokens": float(self._all_reduce(torch.tensor([local_tokens], dtype=torch.float64))[0]),
            "train/replayed_rows": float(
                self._all_reduce(torch.tensor([float(train_batch.num_rows - fresh_rows)], dtype=torch.float64))[0]
            ),
            "time/generate_s": t_gen - t0,
            "time/train_s": t_train - t_gen,
            "time/step_s": time.perf_counter() - t0,
        }
        metrics.update(actor_metrics)
        metrics.update(self._bin_metrics(ids, bins, counts, rewards_global, response_bins, w_bin))
        if self.prompt_gdro is not None:
            metrics.update(self.prompt_gdro.diagnostics(response_bins, w_bin))
        if self.rollout_gdro is not None:
            metrics.update(self.rollout_gdro.diagnostics(plan, bins))
        if self.dynamo is not None:
            metrics.update({f"dynamo/{k}": v for k, v in self.dynamo.diagnostics(plan).items()})
        for n_val, c in zip(*torch.unique(counts, return_counts=True)):
            metrics[f"alloc/n_hist/{int(n_val)}"] = float(c)
        return metrics

    # ------------------------------------------------------------ DP helpers
    @staticmethod
    def _canonical_rows(row_positions: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Global canonical index of each local row (``[R_local]``).

        Rows are ordered by prompt position, then by their order within the
        prompt's group; ``row_positions`` holds each local row's prompt position.
        """
        offsets = torch.cumsum(counts, 0) - counts
        order = torch.sort(row_positions, stable=True).indices
        within = torch.empty_like(row_positions)
        sorted_pos = row_positions[order]
        first = torch.searchsorted(sorted_pos, sorted_pos, right=False)
        within[order] = torch.arange(row_positions.numel()) - first
        return offsets[row_positions] + within

    def _all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over DP ranks (identity with one rank)."""
        if self.dp_size > 1:
            import torch.distributed as dist

            dist.all_reduce(tensor, group=self.dp_group)
        return tensor

    def _reduce_pipeline(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over pipeline stages (identity without pipeline parallelism)."""
        if self.dist.pipeline_parallel > 1:
            import torch.distributed as dist
            from megatron.core import parallel_state

            dist.all_reduce(tensor, group=parallel_state.get_pipeline_model_parallel_group())
        return tensor

    def _share_signal_across_stages(self, signal: torch.Tensor) -> torch.Tensor:
        """The per-row signal is written on the last pipeline stage only; give it to every stage."""
        if self.dist.pipeline_parallel == 1:
            return signal
        ok = ~torch.isnan(signal)
        both = torch.stack([torch.where(ok, signal, torch.zeros_like(signal)), ok.double()])
        both = self._reduce_pipeline(both)
        return torch.where(both[1] > 0, both[0], torch.full_like(both[0], math.nan))

    def _scatter_rows(self, local: torch.Tensor, canon: torch.Tensor, total: int) -> torch.Tensor:
        """Assemble a global per-row vector from every rank's rows (float64 ``[R_global]``).

        Rows no rank filled with a number come back NaN (callers check).
        """
        values = local.to(torch.float64)
        ok = ~torch.isnan(values)
        out = torch.zeros(2, total, dtype=torch.float64)
        out[0, canon[ok]] = values[ok]
        out[1, canon[ok]] = 1.0
        out = self._all_reduce(out)
        return torch.where(out[1] > 0, out[0], torch.full_like(out[0], math.nan))

    def _loss_signal(self, surrogate: torch.Tensor, rewards, gi, num) -> torch.Tensor:
        kind = self.setup.prompt_gdro.signal if self.setup.prompt_gdro else "surrogate"
        if kind == "failure":
            return failure_signal(rewards, self.verifier.reward_range)
        if kind == "learnability":
            return learnability_signal(rewards, gi, num, self.setup.difficulty.correct_threshold)
        if torch.isnan(surrogate).any():
            raise RuntimeError("some rows received no loss signal: every fresh row must be trained once per step")
        return surrogate

    def _train_minibatches(
        self, batch, raw_adv: torch.Tensor, signal: torch.Tensor, step: int, canon: torch.Tensor, total_rows: int
    ) -> dict[str, float]:
        """One optimizer step per mini-batch; returns metrics averaged over mini-batches.

        Fresh rows are assigned to mini-batches by one global permutation of the
        canonical rows, so mini-batch membership does not depend on the DP size;
        replayed rows (kept per rank) are spread by a per-rank permutation. All
        normalisers and statistics are reduced over DP ranks. ``signal`` has one
        scratch slot at its end for the placeholder row of an empty local chunk.
        """
        setup, cfg = self.setup, self.cfg
        num_mb = int(cfg.trainer.minibatches_per_step)
        gen = torch.Generator().manual_seed(self.seed * 104_729 + step)
        chunk_of_global = torch.empty(total_rows, dtype=torch.int64)
        for m, chunk in enumerate(torch.tensor_split(torch.randperm(total_rows, generator=gen), num_mb)):
            chunk_of_global[chunk] = m
        fresh = canon.numel()
        chunk_of_row = torch.empty(batch.num_rows, dtype=torch.int64)
        chunk_of_row[:fresh] = chunk_of_global[canon]
        if batch.num_rows > fresh:
            replay_gen = torch.Generator().manual_seed(self.seed * 7_907 + step * 131 + self.dp_rank)
            replay_perm = torch.randperm(batch.num_rows - fresh, generator=replay_gen)
            chunk_of_row[fresh:] = torch.arange(batch.num_rows - fresh)[replay_perm] % num_mb
        scratch = signal.numel() - 1
        summed: dict[str, float] = {}
        for m in range(num_mb):
            rows = torch.nonzero(chunk_of_row == m).flatten()
            row_index = rows
            placeholder = rows.numel() == 0
            if placeholder:
                # Keep this rank in the collectives with a fully masked row.
                rows, row_index = torch.zeros(1, dtype=torch.int64), torch.tensor([scratch])
            tokens = batch.tokens[rows]
            mask = batch.response_mask[rows] & (not placeholder)
            extras = {
                "response_mask": mask,
                "behaviour_logp": batch.behaviour_logp[rows],
                "advantages": batch.advantages[rows],
                "raw_advantages": raw_adv[rows],
                "row_index": row_index,
            }
            if setup.policy_loss.kl_coef > 0:
                extras["ref_logp"] = self.reference.compute_token_stats(tokens)["logp"]
            counts = self._all_reduce(
                torch.tensor([float(mask.sum()), float((mask.sum(-1) > 0).sum())], dtype=torch.float64)
            )
            if counts[0] == 0:
                continue  # nothing to learn from in this mini-batch on any rank
            mod_stats, ratio_mean = None, None
            needs_prepass = (setup.dynamo_modulation is not None and setup.dynamo_modulation.scope == "minibatch") or (
                setup.r2vpo is not None and setup.r2vpo.center == "batch_mean"
            )
            if needs_prepass:
                # Mini-batch-scope statistics must come from the policy being updated,
                # before this optimizer step; one no-grad pass provides them.
                now = self.actor.compute_token_stats(tokens)
                if setup.dynamo_modulation is not None:
                    adv_tok = batch.advantages[rows][:, None].expand_as(now["logp"])
                    mod_stats = modulation_stats(
                        adv_tok, now["logp"], extras["behaviour_logp"], now["entropy"], mask,
                        setup.dynamo_modulation, ebar_exact=now["ebar"],
                    )
                    if self.dp_size > 1:
                        mod_stats = mod_stats.reduce(group=self.dp_group)
                if setup.r2vpo is not None and setup.r2vpo.center == "batch_mean":
                    ratio = torch.exp((now["logp"] - extras["behaviour_logp"]).clamp(-20, 20))
                    sums = self._all_reduce(
                        torch.tensor([float((ratio * mask).sum()), float(mask.sum())], dtype=torch.float64)
                    )
                    ratio_mean = float(sums[0] / sums[1].clamp_min(1))
            loss_fn = MinibatchLoss(
                policy=setup.policy_loss,
                r2vpo=setup.r2vpo,
                lam=self.dual.lam if self.dual else 0.0,
                modulation=setup.dynamo_modulation,
                modulation_stats=mod_stats,
                ratio_mean=ratio_mean,
                global_num_tokens=float(counts[0]),
                global_num_seqs=float(counts[1]),
                signal=signal,
                signal_include_kl=bool(setup.prompt_gdro and setup.prompt_gdro.signal_include_kl),
            )
            result = self.actor.train_step(tokens, extras, loss_fn)
            self._reduce_accumulator(loss_fn)
            mb = loss_fn.acc.metrics()
            mb["actor/grad_norm"] = float(result.get("grad_norm", math.nan))
            mb["actor/lr"] = float(result.get("lr", math.nan))
            if self.dual is not None:
                sum_sq, n_tok = loss_fn.ratio_variance_sums()
                v_hat = sum_sq / max(n_tok, 1.0)
                self.dual.update(v_hat)
                mb["r2vpo/V"] = v_hat
                mb["r2vpo/lambda"] = self.dual.lam
            for key, value in mb.items():
                summed[key] = summed.get(key, 0.0) + value
            summed["actor/minibatches"] = summed.get("actor/minibatches", 0.0) + 1.0
        done = max(summed.pop("actor/minibatches", 0.0), 1.0)
        return {k: v / done for k, v in summed.items()}

    def _reduce_accumulator(self, loss_fn: MinibatchLoss) -> None:
        """Sum the step accumulator over DP ranks and pipeline stages.

        The loss runs only on the last pipeline stage; the other stages hold
        zeros, so a sum over the pipeline group hands every stage its values.
        """
        if self.dp_size == 1 and self.dist.pipeline_parallel == 1:
            return
        acc = loss_fn.acc
        if not acc.modulation and self.setup.dynamo_modulation is not None:
            acc.modulation = {k: 0.0 for k in ("beta_comp/mean", "beta_stab/mean", "frac_beta_stab_below_0.95")}
        names = [f.name for f in fields(acc) if f.name != "modulation"]
        mod_keys = sorted(acc.modulation)
        vec = torch.tensor([getattr(acc, n) for n in names] + [acc.modulation[k] for k in mod_keys], dtype=torch.float64)
        vec = self._reduce_pipeline(self._all_reduce(vec))
        for n, v in zip(names, vec.tolist()):
            setattr(acc, n, v)
        for k, v in zip(mod_keys, vec.tolist()[len(names) :]):
            acc.modulation[k] = v

    def _bin_metrics(self, ids, bins, counts, rewards, response_bins, w_bin) -> dict[str, float]:
        nb = self.classifier.num_bins
        out: dict[str, float] = {}
        prompt_share = torch.bincount(bins, minlength=nb).double() / bins.numel()
        resp_count = torch.bincount(response_bins, minlength=nb).double()
        reward_sum = torch.zeros(nb, dtype=torch.float64).index_add_(0, response_bins, rewards.double())
        budget = torch.zeros(nb, dtype=torch.float64).index_add_(0, bins, counts.double())
        for b in range(nb):
            out[f"bins/prompt_share/{b}"] = float(prompt_share[b])
            out[f"bins/budget_share/{b}"] = float(budget[b] / budget.sum())
            if resp_count[b] > 0:
                out[f"bins/reward_mean/{b}"] = float(reward_sum[b] / resp_count[b])
                out[f"bins/n_per_prompt/{b}"] = float(budget[b] / (prompt_share[b] * bins.numel()))
        return out

    # ----------------------------------------------------------------- lifetime
    def close(self) -> None:
        """Tear down the process groups this trainer initialised."""
        from nemo_gdro.parallel.distributed import destroy_distributed

        destroy_distributed()

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------- checkpoints
    def _layout(self) -> dict[str, int]:
        d = self.dist
        return {"dp_rank": d.dp_rank, "tp_rank": d.tp_rank, "pp_rank": d.pp_rank, "dp": d.data_parallel,
                "tp": d.tensor_parallel, "pp": d.pipeline_parallel}

    def _save_checkpoint(self) -> Path:
        """Collective: replicated state once, each rank's shards (store, RNG, model-parallel actor)."""
        from nemo_gdro.trainer.checkpoint import capture_rng_state

        components: dict[str, Any] = {
            "controllers": self.controller_state(include_store=False),
            "trainer": {
                "step": self.step,
                "sft_done": self.sft_done,
                "sft_eval": self.sft_eval,
                "last_eval": self.last_eval,
            },
        }
        per_rank: dict[str, Any] = {
            "layout": self._layout(),
            "prompt_stats": self.store.state_dict(),
            "rng": capture_rng_state(),
        }
        # Under plain DP every rank holds the same model; with TP/PP each holds a slice.
        actor_target = per_rank if self.model_parallel > 1 else components
        actor_target["actor"] = self.actor.state_dict()
        if self.reference is not None:
            actor_target["reference"] = self.reference.state_dict()
        return self.checkpoints.save(
            self.step, components, config_yaml=OmegaConf.to_yaml(self.cfg), per_rank=per_rank
        )

    def _load_checkpoint(self, path: Path) -> None:
        from nemo_gdro.trainer.checkpoint import restore_rng_state

        state = self.checkpoints.load(path)
        layouts = state["layout"]
        trainer = state["trainer"]
        self.sft_done = bool(trainer["sft_done"])
        if self.sft_done:
            self._enter_rl_phase()
        mine = self._layout()
        if isinstance(state["actor"], list):
            match = [i for i, lay in enumerate(layouts) if (lay["tp"], lay["pp"], lay["tp_rank"], lay["pp_rank"])
                     == (mine["tp"], mine["pp"], mine["tp_rank"], mine["pp_rank"])]
            if not match:
                saved = (layouts[0]["tp"], layouts[0]["pp"])
                raise ConfigError(
                    f"checkpoint {path} was written with (tensor_parallel, pipeline_parallel)={saved}; this run uses "
                    f"{(mine['tp'], mine['pp'])}. Resume with the same model-parallel layout (DP may change)."
                )
            actor_state = state["actor"][match[0]]
            reference_state = state["reference"][match[0]] if "reference" in state else None
        else:
            actor_state, reference_state = state["actor"], state.get("reference")
        self.actor.load_state_dict(actor_state)
        if self.reference is not None:
            if reference_state is None:
                raise ConfigError(f"checkpoint {path} has no reference policy but algorithm.policy_loss.kl_coef > 0")
            self.reference.load_state_dict(reference_state)
        self.load_controller_state(state["controllers"])
        # One shard per saved DP rank (TP/PP peers hold copies), resharded to this DP size.
        by_dp = {}
        for lay, shard in zip(layouts, state["prompt_stats"]):
            by_dp.setdefault(lay["dp_rank"], shard)
        self.store.load_resharded([by_dp[r] for r in sorted(by_dp)])
        self.step = int(trainer["step"])
        self.sft_eval = dict(trainer["sft_eval"])
        self.last_eval = dict(trainer["last_eval"])
        rngs = state["rng"]
        restore_rng_state(rngs[self.dist.rank] if len(rngs) == self.dist.world_size else rngs[0])
        self._push_weights()

    def _enter_rl_phase(self) -> None:
        """Switch the actor's optimizer to the RL settings; freeze a reference copy if KL is on."""
        from nemo_gdro.trainer.actor import MegatronActor

        self.actor.reset_optimizer(self.optim)
        if self.setup.policy_loss.kl_coef > 0 and self.reference is None:
            self.reference = MegatronActor(self.spec, self.optim, seed=self.seed, temperature=float(self.cfg.rollout.temperature))
            self.reference.load_state_dict(self.actor.state_dict())

    def _push_weights(self) -> None:
        self.engine.load_weights(self.actor.export_hf_state_dict(), version=self.step)

    # ------------------------------------------------------------------- run
    def run(self) -> RunResult:
        from nemo_gdro.trainer.metrics import MetricsLogger, ProgressBar
        from nemo_gdro.trainer.plots import make_plots, write_summary

        cfg = self.cfg
        resume = cfg.run.resume
        fresh = resume is None or str(resume).lower() == "none"
        # latest() re-hashes whole checkpoints: look once.
        if fresh and self.checkpoints.list_checkpoints() and self.checkpoints.latest() is not None:
            raise ConfigError(
                f"{self.output_dir} already holds checkpoints: pass run.resume=auto to continue that run "
                "or choose another run.output_dir / run.name"
            )
        resume_path = None if fresh else self.checkpoints.resolve_resume(resume)
        if resume_path is not None:
            self._load_checkpoint(resume_path)
            print(f"[nemo-gdro] resumed from {resume_path} at step {self.step}", flush=True)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if self.is_main:
            logger = MetricsLogger(
                self.output_dir,
                tensorboard=bool(cfg.logging.tensorboard),
                wandb=OmegaConf.to_container(cfg.logging.wandb) if cfg.logging.wandb else None,
                resume_step=self.step if resume_path is not None else None,
            )
        else:
            logger = _NoLogger()
        d = self.dist
        print(
            f"[nemo-gdro rank {d.rank}/{d.world_size}] dp {d.dp_rank}/{d.data_parallel} tp {d.tp_rank}/"
            f"{d.tensor_parallel} pp {d.pp_rank}/{d.pipeline_parallel} backend {d.backend}: {self.setup.describe()}",
            flush=True,
        )
        try:
            if not self.sft_done:
                self._push_weights()
                before = self.evaluate(-1)
                logger.log_eval(0, {f"{k}/before_sft": v for k, v in before.items()})
                sft_metrics = self.sft()
                self.sft_done = True
                self._enter_rl_phase()
                self._push_weights()
                self.sft_eval = self.evaluate(0)
                self.last_eval = self.sft_eval
                logger.log_eval(0, self.sft_eval)
                logger.log(0, sft_metrics)
                if self.is_main:
                    print(f"[nemo-gdro] after SFT: {_fmt(self.sft_eval)}", flush=True)
                self._save_checkpoint()
            max_steps = int(cfg.trainer.max_steps)
            eval_every, ckpt_every = int(cfg.trainer.eval_every), int(cfg.trainer.checkpoint_every)
            progress = ProgressBar(max_steps) if (cfg.logging.progress and self.is_main) else None
            while self.step < max_steps:
                metrics = self.rl_step(self.step)
                self.step += 1
                logger.log(self.step, metrics)
                if progress is not None:
                    progress.update(
                        self.step,
                        reward=metrics["train/reward_mean"],
                        pass_rate=metrics["train/pass_rate"],
                        step_time=metrics["time/step_s"],
                    )
                last = self.step == max_steps
                if last or (eval_every and self.step % eval_every == 0):
                    self.last_eval = self.evaluate(self.step)
                    logger.log_eval(self.step, self.last_eval)
                if last or (ckpt_every and self.step % ckpt_every == 0):
                    self._save_checkpoint()
            if progress is not None:
                progress.close()
        finally:
            logger.close()
        if not self.is_main:
            return RunResult(self.output_dir, self.step, self.last_eval, self.sft_eval)
        plots = make_plots(self.output_dir)
        summary = write_summary(self.output_dir)
        print(f"[nemo-gdro] done: {self.step} RL steps. eval after SFT: {_fmt(self.sft_eval)}", flush=True)
        print(f"[nemo-gdro] eval at step {self.step}: {_fmt(self.last_eval)}", flush=True)
        print(f"[nemo-gdro] metrics: {self.output_dir / 'metrics.jsonl'} (TensorBoard: {self.output_dir})", flush=True)
        print(f"[nemo-gdro] plots:   {self.output_dir / 'plots'} ({len(plots)} PNG); summary: {summary}", flush=True)
        return RunResult(self.output_dir, self.step, self.last_eval, self.sft_eval)


class _NoLogger:
    """Stands in for the metrics logger on ranks other than 0."""

    def log(self, step: int, metrics: dict) -> None:
        pass

    def log_eval(self, step: int, metrics: dict) -> None:
        pass

    def close(self) -> None:
        pass


def _fmt(metrics: dict[str, float]) -> str:
    keys = [k for k in metrics if "/band_" not in k]
    return ", ".join(f"{k.split('/', 1)[1]} {metrics[k]:.3f}" for k in keys)


def train(overrides: list[str] | None = None, config_name: str = "train") -> RunResult:
    """Compose the config with ``overrides`` and run training."""
    from nemo_gdro.trainer.config import compose

    with Trainer(compose(config_name, overrides)) as trainer:
        return trainer.run()
