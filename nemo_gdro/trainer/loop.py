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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from nemo_gdro.algorithms.advantages import grpo_advantages, pass_at_k, zero_variance_group_fraction
from nemo_gdro.algorithms.bin_index import BinIndex
from nemo_gdro.algorithms.difficulty import DifficultyClassifier
from nemo_gdro.algorithms.dynamo import DynamoAllocator, ModulationStats, modulation_stats
from nemo_gdro.algorithms.losses import DualVariableController
from nemo_gdro.algorithms.prompt_gdro import PromptGDRO, failure_signal, learnability_signal
from nemo_gdro.algorithms.rollout_gdro import RolloutGDRO
from nemo_gdro.algorithms.segments import segment_sum
from nemo_gdro.algorithms.stats import PromptStatsStore, group_outcomes
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
        self.dist = init_distributed(seed=self.seed)
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
        self.engine = HFRolloutEngine(self.hf_config, self.tokenizer, self.train_sampling, seed=self.seed)
        self.eval_engine = HFRolloutEngine(self.hf_config, self.tokenizer, self.eval_sampling, seed=self.seed + 1)
        self.verifier = ArithmeticVerifier()

        num_prompts = len(self.train_ds)
        self.store = PromptStatsStore(num_prompts, setup.stats)
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
        self.checkpoints = CheckpointManager(self.output_dir / "checkpoints", keep_last=int(cfg.trainer.keep_last_checkpoints))
        self.step = 0
        self.sft_done = False
        self.sft_eval: dict[str, float] = {}
        self.last_eval: dict[str, float] = {}

    # --------------------------------------------------------------- controllers
    def controller_state(self) -> dict[str, Any]:
        """Every controller's state (the checkpoint's ``controllers`` component)."""
        state: dict[str, Any] = {
            "store": self.store.state_dict(),
            "classifier": self.classifier.state_dict(),
            "sampler": self.sampler.state_dict(),
        }
        for name in ("prompt_gdro", "bin_index", "rollout_gdro", "dynamo", "dual", "replay"):
            obj = getattr(self, name)
            if obj is not None:
                state[name] = obj.state_dict()
        return state

    def load_controller_state(self, state: dict[str, Any]) -> None:
        self.store.load_state_dict(state["store"])
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
            count = float(mask.sum())

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

        # 2. generation and rewards.
        records = self.train_ds.get_many(ids)
        batch = self.engine.generate(records, counts, step=step)
        t_gen = time.perf_counter()
        rewards = self.verifier.score_batch(batch.responses, batch.answers).to(torch.float32)
        batch.rewards = rewards
        gi = batch.group_index

        # 3. advantages and per-response weights.
        raw_adv = grpo_advantages(rewards, gi, num, setup.advantage)
        response_bins = bins[gi]
        weights = torch.ones_like(raw_adv, dtype=torch.float64)
        w_bin = None
        if setup.advantage_weighting == "prompt_gdro":
            weights, w_bin = self.prompt_gdro.response_weights(response_bins)
        if setup.sampler == "prompt_gdro" and setup.prompt_gdro.importance_correct:
            weights = weights * self.prompt_gdro.importance_weights(response_bins, q, self.bin_index)
        batch.advantages = (raw_adv.double() * weights).to(torch.float32)

        # 4. behaviour log-probs, recomputed by the actor (never taken from the engine).
        stats = self.actor.compute_token_stats(batch.tokens)
        batch.behaviour_logp = stats["logp"].detach()
        fresh_rows = batch.num_rows
        raw_all = raw_adv
        train_batch = batch
        if self.replay is not None:
            self.replay.evict(step)
            n_replay = int(round(setup.r2vpo.replay_ratio * num))
            groups = self.replay.sample(n_replay, step)
            if groups:
                train_batch = type(batch).concat([batch] + [g.rows for g in groups])
                raw_all = torch.cat([raw_adv] + [g.rows.advantages.float() for g in groups])
            self.replay.add(batch, version=step)

        # 5. optimizer steps over shuffled mini-batches.
        signal = torch.full((train_batch.num_rows,), math.nan, dtype=torch.float64)
        actor_metrics = self._train_minibatches(train_batch, raw_all, signal, step)
        t_train = time.perf_counter()

        # 6. new weights to the engine; controllers learn from this step's (fresh) rows.
        self.engine.load_weights(self.actor.export_hf_state_dict(), version=step + 1)
        p_rollouts, p_correct = group_outcomes(rewards, gi, num, setup.difficulty.correct_threshold)
        self.store.observe(ids, p_rollouts, p_correct)
        loss_signal = self._loss_signal(signal[:fresh_rows], rewards, gi, num)
        if self.prompt_gdro is not None:
            self.prompt_gdro.observe(response_bins, loss_signal)
        if self.rollout_gdro is not None:
            self.rollout_gdro.observe(response_bins, loss_signal, plan, bins, group_index=gi)
        if self.bin_index is not None:
            # Refresh the sampler's bin membership of the prompts just observed.
            self.bin_index.move(ids, self.classifier.classify(ids))

        # Kept for inspection (tests, debugging); replaced every step.
        self.last_batch = batch
        self.last_bins = bins

        # 7. metrics.
        metrics = {
            "train/reward_mean": float(rewards.mean()),
            "train/pass_rate": float((p_correct > 0).double().mean()),
            "train/zero_variance_groups": zero_variance_group_fraction(rewards, gi, num),
            "train/rollouts": float(counts.sum()),
            "train/response_tokens": float(batch.response_mask.sum()),
            "train/replayed_rows": float(train_batch.num_rows - fresh_rows),
            "time/generate_s": t_gen - t0,
            "time/train_s": t_train - t_gen,
            "time/step_s": time.perf_counter() - t0,
        }
        metrics.update(actor_metrics)
        metrics.update(self._bin_metrics(ids, bins, counts, rewards, response_bins, w_bin))
        if self.prompt_gdro is not None:
            metrics.update(self.prompt_gdro.diagnostics(response_bins, w_bin))
        if self.rollout_gdro is not None:
            metrics.update(self.rollout_gdro.diagnostics(plan, bins))
        if self.dynamo is not None:
            metrics.update({f"dynamo/{k}": v for k, v in self.dynamo.diagnostics(plan).items()})
        for n_val, c in zip(*torch.unique(counts, return_counts=True)):
            metrics[f"alloc/n_hist/{int(n_val)}"] = float(c)
        return metrics

    def _loss_signal(self, surrogate: torch.Tensor, rewards, gi, num) -> torch.Tensor:
        kind = self.setup.prompt_gdro.signal if self.setup.prompt_gdro else "surrogate"
        if kind == "failure":
            return failure_signal(rewards, self.verifier.reward_range)
        if kind == "learnability":
            return learnability_signal(rewards, gi, num, self.setup.difficulty.correct_threshold)
        if torch.isnan(surrogate).any():
            raise RuntimeError("some rows received no loss signal: every fresh row must be trained once per step")
        return surrogate

    def _train_minibatches(self, batch, raw_adv: torch.Tensor, signal: torch.Tensor, step: int) -> dict[str, float]:
        setup, cfg = self.setup, self.cfg
        gen = torch.Generator().manual_seed(self.seed * 104_729 + step)
        order = torch.randperm(batch.num_rows, generator=gen)
        chunks = torch.tensor_split(order, int(cfg.trainer.minibatches_per_step))
        summed: dict[str, float] = {}
        for mb_index, rows in enumerate(chunks):
            if rows.numel() == 0:
                continue
            rows = rows.sort().values
            tokens = batch.tokens[rows]
            mask = batch.response_mask[rows]
            extras = {
                "response_mask": mask,
                "behaviour_logp": batch.behaviour_logp[rows],
                "advantages": batch.advantages[rows],
                "raw_advantages": raw_adv[rows],
                "row_index": rows,
            }
            if setup.policy_loss.kl_coef > 0:
                extras["ref_logp"] = self.reference.compute_token_stats(tokens)["logp"]
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
                if setup.r2vpo is not None and setup.r2vpo.center == "batch_mean":
                    ratio = torch.exp((now["logp"] - extras["behaviour_logp"]).clamp(-20, 20))
                    ratio_mean = float((ratio * mask).sum() / mask.sum().clamp_min(1))
            loss_fn = MinibatchLoss(
                policy=setup.policy_loss,
                r2vpo=setup.r2vpo,
                lam=self.dual.lam if self.dual else 0.0,
                modulation=setup.dynamo_modulation,
                modulation_stats=mod_stats,
                ratio_mean=ratio_mean,
                global_num_tokens=float(mask.sum()),
                global_num_seqs=float((mask.sum(-1) > 0).sum()),
                signal=signal,
                signal_include_kl=bool(setup.prompt_gdro and setup.prompt_gdro.signal_include_kl),
            )
            result = self.actor.train_step(tokens, extras, loss_fn)
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
        count = max(len([c for c in chunks if c.numel()]), 1)
        return {k: v / count for k, v in summed.items()}

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
    def _save_checkpoint(self) -> Path:
        from nemo_gdro.trainer.checkpoint import capture_rng_state

        components = {
            "actor": self.actor.state_dict(),
            "controllers": self.controller_state(),
            "trainer": {
                "step": self.step,
                "sft_done": self.sft_done,
                "sft_eval": self.sft_eval,
                "last_eval": self.last_eval,
            },
            "rng": capture_rng_state(),
        }
        if self.reference is not None:
            components["reference"] = self.reference.state_dict()
        return self.checkpoints.save(self.step, components, config_yaml=OmegaConf.to_yaml(self.cfg))

    def _load_checkpoint(self, path: Path) -> None:
        from nemo_gdro.trainer.checkpoint import restore_rng_state

        state = self.checkpoints.load(path)
        trainer = state["trainer"]
        self.sft_done = bool(trainer["sft_done"])
        if self.sft_done:
            self._enter_rl_phase()
        self.actor.load_state_dict(state["actor"])
        if self.reference is not None:
            if "reference" not in state:
                raise ConfigError(f"checkpoint {path} has no reference policy but algorithm.policy_loss.kl_coef > 0")
            self.reference.load_state_dict(state["reference"])
        self.load_controller_state(state["controllers"])
        self.step = int(trainer["step"])
        self.sft_eval = dict(trainer["sft_eval"])
        self.last_eval = dict(trainer["last_eval"])
        restore_rng_state(state["rng"])
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
        logger = MetricsLogger(
            self.output_dir,
            tensorboard=bool(cfg.logging.tensorboard),
            wandb=OmegaConf.to_container(cfg.logging.wandb) if cfg.logging.wandb else None,
            resume_step=self.step if resume_path is not None else None,
        )
        print(f"[nemo-gdro] {self.setup.describe()}", flush=True)
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
                print(f"[nemo-gdro] after SFT: {_fmt(self.sft_eval)}", flush=True)
                self._save_checkpoint()
            max_steps = int(cfg.trainer.max_steps)
            eval_every, ckpt_every = int(cfg.trainer.eval_every), int(cfg.trainer.checkpoint_every)
            progress = ProgressBar(max_steps) if cfg.logging.progress else None
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
        plots = make_plots(self.output_dir)
        summary = write_summary(self.output_dir)
        print(f"[nemo-gdro] done: {self.step} RL steps. eval after SFT: {_fmt(self.sft_eval)}", flush=True)
        print(f"[nemo-gdro] eval at step {self.step}: {_fmt(self.last_eval)}", flush=True)
        print(f"[nemo-gdro] metrics: {self.output_dir / 'metrics.jsonl'} (TensorBoard: {self.output_dir})", flush=True)
        print(f"[nemo-gdro] plots:   {self.output_dir / 'plots'} ({len(plots)} PNG); summary: {summary}", flush=True)
        return RunResult(self.output_dir, self.step, self.last_eval, self.sft_eval)


def _fmt(metrics: dict[str, float]) -> str:
    keys = [k for k in metrics if "/band_" not in k]
    return ", ".join(f"{k.split('/', 1)[1]} {metrics[k]:.3f}" for k in keys)


def train(overrides: list[str] | None = None, config_name: str = "train") -> RunResult:
    """Compose the config with ``overrides`` and run training."""
    from nemo_gdro.trainer.config import compose

    with Trainer(compose(config_name, overrides)) as trainer:
        return trainer.run()
