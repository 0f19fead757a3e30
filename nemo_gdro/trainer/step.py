"""One RL step, top to bottom (design.md's diagram)::

    draw prompts -> classify (history up to t-1) -> allocate n_i -> generate
    -> verify (correctness) -> shape rewards (overlong) -> GRPO advantages
    x stage weights -> behaviour log-probs
    (recomputed by the actor where the training forward cannot supply them,
    :mod:`~nemo_gdro.trainer.behaviour`) -> [+ replayed groups] -> mini-batches:
    optimizer steps (policy-loss stage, token-modulation stage)
    -> weights to the rollout engine -> store + controllers observe -> metrics.

Every stage is called through its protocol (:mod:`nemo_gdro.stages`); rows
of all data-parallel ranks meet in their canonical order
(:class:`~nemo_gdro.parallel.rows.StepRows`). Every decision is a
deterministic function of the run seed, the step and the checkpointed state.

Correctness and rewards are kept apart: the verifier's ``correct`` verdicts
feed the pass-rate statistics, difficulty bins and the controllers' failure /
learnability signals; the shaped rewards (``reward.correct_reward`` /
``wrong_reward`` plus the optional overlong penalty) feed the advantages.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from nemo_gdro.algorithms.advantages import grpo_advantages, zero_variance_group_fraction
from nemo_gdro.algorithms.mismatch import MISMATCH_ROWS, MismatchSums, mismatch_sums, truncated_is_weights
from nemo_gdro.algorithms.stats import group_outcomes
from nemo_gdro.parallel.rows import StepRows
from nemo_gdro.rewards.result import VerifyResult
from nemo_gdro.rewards.shaping import overlong_penalty
from nemo_gdro.rollout.batch import RolloutBatch
from nemo_gdro.rollout.seeds import prompt_seeds
from nemo_gdro.stages import MinibatchView, PromptDraw, StepFeedback
from nemo_gdro.stages.signal import controller_signal
from nemo_gdro.trainer.behaviour import behaviour_plan
from nemo_gdro.trainer.diagnostics import modulation_extremes
from nemo_gdro.trainer.guards import UpdateGuard, sampling_failure
from nemo_gdro.trainer.rl_loss import MinibatchLoss

__all__ = ["ControllerClock", "RLStep"]

#: Metrics of a controller's state: the step reports the value after its last optimizer step.
LAST_VALUE_METRICS = frozenset({"r2vpo/lambda_positive"})


@dataclass
class Generated:
    """This rank's rollouts of a step with their rewards, and the global row layout."""

    batch: RolloutBatch
    rows: StepRows
    rewards: torch.Tensor  # float32 [R] global, canonical order (shaped)
    correct: torch.Tensor  # bool [R_local]: the verifier's verdicts of this rank's rows
    correct_global: torch.Tensor  # float64 [R] 0/1, canonical order
    verify: VerifyResult  # this rank's verification outcome (timeouts, failures, wall time)
    overlong: torch.Tensor  # bool [R_local]: the row's reward carries an overlong penalty
    truncated: torch.Tensor  # bool [R_local]: hit rollout.max_new_tokens without a stop token


class ControllerClock:
    """Wall time of the stage controllers' own calls in one step, in seconds.

    Counted: drawing prompts, classifying them, allocating rollouts, the
    advantage weights, each mini-batch's loss / modulation ``prepare`` and the
    loss's ``after_update``, the pass-rate store and every observer. Not
    counted: generation, verification, the model's forward/backward and
    optimizer step, and the weight push to the engine, so that
    ``time/controllers_ms`` is the overhead an algorithm adds to GRPO.
    """

    def __init__(self) -> None:
        self.seconds = 0.0

    @contextmanager
    def __call__(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - start


class RLStep:
    """Callable ``step -> metrics``; holds references to the run's components (see :class:`~nemo_gdro.trainer.components.Components`)."""

    def __init__(self, components: Any, guard: UpdateGuard | None = None) -> None:
        self.c = components
        #: Decides before every optimizer step whether it may be applied (non-finite loss / gradients).
        self.guard = guard if guard is not None else UpdateGuard()
        cfg = components.cfg
        self.num_prompts = cfg.trainer.prompts_per_step
        self.num_minibatches = cfg.trainer.minibatches_per_step
        self.seed = cfg.seed
        self.setup = cfg.algorithm
        self.tis_cap = cfg.rollout.tis_cap
        self.max_new_tokens = cfg.rollout.max_new_tokens
        self.overlong = cfg.reward.overlong_config
        self.mask_truncated = cfg.reward.mask_truncated
        #: Where the behaviour log-probs come from (a separate pass only where they would differ).
        self.behaviour = behaviour_plan(
            minibatches_per_step=self.num_minibatches, replays=cfg.algorithm.replays, tis=self.tis_cap is not None,
            needs_current_policy=components.stages.needs_current_policy, epochs_per_batch=cfg.trainer.epochs_per_batch,
        )

    def __call__(self, step: int) -> dict[str, float]:
        c, stages = self.c, self.c.stages
        self._step = step
        self._clock = clock = ControllerClock()
        t0 = time.perf_counter()
        with clock():
            draw = stages.prompts.draw(self.num_prompts)
            bins = c.classifier.classify(draw.ids)
            allocation = stages.rollouts.allocate(draw, bins)
        t_plan = time.perf_counter()

        gen = self._generate(draw, allocation.counts, step)

        raw_adv, bin_weights = self._advantages(gen, draw, bins)
        t_behaviour = time.perf_counter()
        batch = gen.batch
        if self.behaviour.separate_pass:
            batch.behaviour_logp = c.actor.compute_token_stats(batch.tokens, lengths=batch.sequence_lengths)["logp"].detach()
        elif self.behaviour.source == "current":  # filled row by row from the mini-batch's current-policy pass
            batch.behaviour_logp = torch.zeros(batch.num_rows, batch.seq_len - 1, dtype=torch.float32)
        # The engine-vs-actor mismatch of the training forward, per row (behaviour source "forward").
        self._mismatch_rows: dict[str, torch.Tensor] | None = None
        self._forward_ran = False
        t_train = time.perf_counter()
        train_batch, raw_all = c.replay.mix(batch, raw_adv, step)
        actor_metrics, signal = self._optimize(train_batch, raw_all, gen.rows, step)
        actor_metrics.update(self._engine_mismatch(batch))
        actor_metrics["actor/behaviour_pass"] = 1.0 if self.behaviour.separate_pass else 0.0
        t_push = time.perf_counter()

        c.engine.load_weights(c.actor.export_hf_state_dict(), version=step + 1)
        t_pushed = time.perf_counter()
        with clock():
            feedback = self._observe(gen, draw, bins, allocation, signal, bin_weights)
        c.verify_replicated(step, {"bins": bins, "counts": allocation.counts})

        metrics = self._step_metrics(gen, feedback, train_batch)
        metrics.update(actor_metrics)
        for observer in stages.observers:
            metrics.update(observer.diagnostics(feedback))
        metrics.update(
            {
                # time/verify_s (the verifier's own wall time) comes with the reward metrics.
                "time/plan_s": t_plan - t0,
                "time/generate_s": self._generate_s,
                "time/behaviour_s": t_train - t_behaviour,
                "time/train_s": t_push - t_train,
                "time/weight_push_s": t_pushed - t_push,
                "time/controllers_ms": 1e3 * clock.seconds,
                "time/step_s": time.perf_counter() - t0,
            }
        )
        self.last = gen  # kept for inspection (tests, debugging); replaced every step
        self.last_bins = bins
        self.last_draw = draw
        return metrics

    # ----------------------------------------------------------------- stages
    def _generate(self, draw: PromptDraw, counts: torch.Tensor, step: int) -> Generated:
        """This rank's prompts through the engine and the verifier; rewards assembled globally."""
        c = self.c
        mine = c.dp.my_positions(self.num_prompts)
        records = c.task.train.get_many(draw.ids[mine])
        # Seeds of the whole step's prompt list, then this rank's slice: rollouts do not depend on the layout.
        seeds = prompt_seeds(self.seed, step, draw.ids)
        start = time.perf_counter()
        try:
            batch = c.engine.generate(records, counts[mine], seeds[mine])
        except RuntimeError as err:
            raise (sampling_failure(err, step + 1, "generation") or err) from err
        self._generate_s = time.perf_counter() - start  # the engine alone (verification: time/verify_s)
        verifier = c.task.verifier
        result = verifier.verify_batch(batch.responses, batch.answers)
        rewards = verifier.rewards(result).to(torch.float32)
        overlong = torch.zeros(batch.num_rows, dtype=torch.bool)
        if self.overlong.enabled:
            penalty = overlong_penalty(
                batch.response_lengths, self.max_new_tokens, self.overlong.buffer_tokens, self.overlong.penalty
            )
            rewards = rewards + penalty
            overlong = penalty < 0
        batch.rewards = rewards
        truncated = (
            batch.truncated if batch.truncated is not None else batch.response_lengths >= self.max_new_tokens
        ).to(torch.bool)
        rows = StepRows.build(counts, batch.group_index, c.dp)
        return Generated(
            batch, rows, rows.scatter(batch.rewards.double()).float(), correct=result.correct,
            correct_global=rows.scatter(result.correct.double()), verify=result, overlong=overlong, truncated=truncated,
        )

    def _advantages(self, gen: Generated, draw: PromptDraw, bins: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """GRPO advantages of this rank's rows (each prompt's rows live on one rank) times the stages' weights."""
        stages, batch, rows = self.c.stages, gen.batch, gen.rows
        raw = grpo_advantages(batch.rewards, batch.group_index, rows.positions.numel(), self.setup.advantage)
        response_bins = bins[rows.group_index]
        # Rows with a non-zero raw advantage, all ranks, canonical order (normalize_over: informative).
        informative = rows.scatter((raw != 0).double()) == 1.0
        weights = torch.ones(rows.num_rows, dtype=torch.float64)
        with self._clock():
            stage_weights, bin_weights = stages.weighting.weights(response_bins, informative)
            correction = stages.prompts.response_weights(draw, response_bins)
        for factor in (stage_weights, correction):
            if factor is not None:
                weights = weights * factor
        batch.advantages = (raw.double() * rows.local_rows_of(weights)).to(torch.float32)
        return raw, bin_weights

    def _optimize(self, batch: RolloutBatch, raw_adv: torch.Tensor, rows: StepRows, step: int):
        """``trainer.epochs_per_batch`` passes over the batch, each reshuffled into
        ``trainer.minibatches_per_step`` mini-batches of one optimizer step each.

        Returns (metrics averaged over the mini-batches of all passes, signal of fresh rows). The
        controllers' per-row signal is the FIRST pass's: gdro.md §2 defines it as the clipped
        surrogate of the step's update on its freshly generated rows (about -A on-policy); a
        later pass would measure how far the earlier passes moved the policy instead.
        """
        epochs = self.c.cfg.trainer.epochs_per_batch
        self._fresh_rows = rows.canon.numel()  # the batch's first rows; replayed groups follow
        signal = torch.full((batch.num_rows,), math.nan, dtype=torch.float64)
        if self.mask_truncated and batch.truncated is not None:
            signal[batch.truncated] = 0.0  # no loss, so no surrogate: its row's signal is zero
        per_key: dict[str, list[float]] = {}
        for epoch in range(epochs):
            assignment = self._minibatch_assignment(batch.num_rows, rows, step, epoch)
            for m in range(self.num_minibatches):
                trained = self._train_minibatch(
                    batch, raw_adv, torch.nonzero(assignment == m).flatten(), signal if epoch == 0 else None
                )
                if trained is None:
                    continue  # nothing to learn from in this mini-batch on any rank
                if epochs > 1:  # how far each pass has moved from the generating policy
                    trained[f"actor/ratio_var/pass{epoch}"] = trained["actor/ratio_var"]
                for key, value in trained.items():
                    per_key.setdefault(key, []).append(value)
        # Means over the mini-batches that report a key; extremes stay extremes; skips and updates are
        # counted; a controller's state after the step is its value after the last update.
        actor_metrics: dict[str, float] = {}
        for key, values in per_key.items():
            if key.endswith("/min"):
                actor_metrics[key] = min(values)
            elif key.endswith("/max"):
                actor_metrics[key] = max(values)
            elif key in ("guard/skipped_updates", "actor/optimizer_steps"):
                actor_metrics[key] = sum(values)
            elif key in LAST_VALUE_METRICS:
                actor_metrics[key] = values[-1]
            else:
                actor_metrics[key] = sum(values) / len(values)
        actor_metrics.setdefault("actor/optimizer_steps", 0.0)
        actor_metrics["guard/skipped_total"] = float(self.guard.skipped_total)
        return actor_metrics, rows.scatter(signal[: rows.canon.numel()])

    def _minibatch_assignment(self, num_rows: int, rows: StepRows, step: int, epoch: int = 0) -> torch.Tensor:
        """Mini-batch of every local row in pass ``epoch``: fresh rows by one global permutation of
        the canonical rows (so membership does not depend on the DP size), replayed rows (kept per
        rank) by a per-rank permutation. Every pass draws fresh permutations; pass 0's are those of
        a single-pass run."""
        # Pass e > 0 shifts the seed past any step count, so no (step, pass) pair repeats another's draw.
        shift = epoch * 2_147_483_647
        gen = torch.Generator().manual_seed(self.seed * 104_729 + step + shift)
        chunk_of_global = torch.empty(rows.num_rows, dtype=torch.int64)
        for m, chunk in enumerate(torch.tensor_split(torch.randperm(rows.num_rows, generator=gen), self.num_minibatches)):
            chunk_of_global[chunk] = m
        fresh = rows.canon.numel()
        out = torch.empty(num_rows, dtype=torch.int64)
        out[:fresh] = chunk_of_global[rows.canon]
        if num_rows > fresh:
            replay_gen = torch.Generator().manual_seed(self.seed * 7_907 + step * 131 + rows.dp.rank + shift)
            out[fresh:] = torch.randperm(num_rows - fresh, generator=replay_gen) % self.num_minibatches
        return out

    def _train_minibatch(
        self, batch: RolloutBatch, raw_adv: torch.Tensor, rows: torch.Tensor, signal: torch.Tensor | None
    ) -> dict[str, float] | None:
        """One optimizer step on ``rows`` of this rank (collective: every rank calls it).

        A rank without rows joins with one fully masked placeholder row so that
        the collectives stay matched; its output is discarded. ``signal``: the
        controllers' per-row signal to fill (first pass), ``None`` in later passes.
        """
        c, stages = self.c, self.c.stages
        placeholder = rows.numel() == 0
        take = torch.zeros(1, dtype=torch.int64) if placeholder else rows
        tokens, lengths = batch.tokens[take], batch.sequence_lengths[take]
        mask = batch.response_mask[take] & (not placeholder)
        if self.mask_truncated and batch.truncated is not None:
            mask = mask & ~batch.truncated[take].unsqueeze(1)  # DAPO overlong filtering: no loss for truncated rows
        source = self.behaviour.source
        extras = {
            "response_mask": mask,
            "advantages": batch.advantages[take],
            "raw_advantages": raw_adv[take],
        }
        if self.setup.replays:
            # Fresh rows come first in the batch: the loss reports its sums for both kinds separately.
            extras["replayed"] = take >= self._fresh_rows
        informative = (mask & (raw_adv[take] != 0).unsqueeze(1)).sum()
        num_tokens, num_seqs, num_informative = c.dp.total(
            float(mask.sum()), float((mask.sum(-1) > 0).sum()), float(informative)
        )
        if num_tokens == 0:
            return None
        if num_informative == 0 and self.setup.policy_loss.loss_agg_mode == "informative-token-mean":
            # No informative token anywhere: no update (as with no tokens). The rows' surrogate at
            # ratio 1 is -A = 0 (the KL part of signal_include_kl is not computed for them).
            if signal is not None and not placeholder:
                signal[rows] = torch.where(torch.isnan(signal[rows]), -raw_adv[rows].double(), signal[rows])
            return None
        extras.update(c.reference.extras(tokens, lengths))
        current = c.actor.compute_token_stats(tokens, lengths=lengths) if stages.needs_current_policy else None
        if source == "current" and signal is not None:
            # First pass (one mini-batch): same weights, same rows: the current policy's log-probs are
            # the behaviour log-probs. Stored for the later passes, which run on updated weights.
            assert current is not None
            if not placeholder:
                batch.behaviour_logp[rows] = current["logp"]
            extras["behaviour_logp"] = current["logp"]
        elif source in ("separate", "current"):
            extras["behaviour_logp"] = batch.behaviour_logp[take]
        elif batch.engine_logp is not None:  # "forward": the mismatch metrics come out of the training forward
            extras["engine_logp"] = batch.engine_logp[take]
            extras["engine_mask"] = batch.response_mask[take] & (not placeholder)
        if self.tis_cap is not None:
            # Truncated importance sampling against the engine that sampled the rows (FP8 / mismatch).
            extras["token_weights"] = truncated_is_weights(
                extras["behaviour_logp"], batch.engine_logp[take], mask, cap=self.tis_cap
            )
        view = MinibatchView(
            advantages=extras["advantages"],
            behaviour_logp=extras.get("behaviour_logp"),
            mask=mask,
            current=current,
        )
        with self._clock():
            loss_context, modulation_context = stages.loss.prepare(view), stages.modulation.prepare(view)
        loss_fn = MinibatchLoss(
            policy=self.setup.policy_loss,
            loss=stages.loss,
            loss_context=loss_context,
            modulation=stages.modulation,
            modulation_context=modulation_context,
            global_num_tokens=num_tokens,
            global_num_seqs=num_seqs,
            global_num_informative_tokens=num_informative,
            signal_include_kl=self.setup.prompt_gdro.signal_include_kl,
            behaviour_from_forward=source == "forward",
        )
        extremes = modulation_extremes(stages.modulation, view, loss_fn.modulation_context, c.dp)
        report = c.actor.forward_backward(tokens, extras, loss_fn, lengths=lengths)
        self._forward_ran = True
        step = self._step + 1  # as logged
        applied = self.guard.allow(step, float(report["loss"]), c.actor.grads_finite())
        if applied:
            report.update(c.actor.optimizer_step())
            self.guard.check_weights(step, c.actor.weights_finite())
        if not placeholder and signal is not None:
            row_signal = report.rows["signal"]
            if not applied:
                # A skipped update: a non-finite surrogate becomes its value at ratio 1 (-A, token mean).
                row_signal = torch.where(torch.isfinite(row_signal), row_signal, -raw_adv[rows].double())
            signal[rows] = row_signal
            if MISMATCH_ROWS[0] in report.rows:
                if self._mismatch_rows is None:
                    self._mismatch_rows = {k: torch.zeros(batch.num_rows, dtype=torch.float64) for k in MISMATCH_ROWS}
                for key in MISMATCH_ROWS:
                    self._mismatch_rows[key][rows] = report.rows[key]
        metrics = loss_fn.metrics(report)
        metrics.update(extremes)
        metrics["guard/skipped_updates"] = 0.0 if applied else 1.0
        metrics["actor/optimizer_steps"] = 1.0 if applied else 0.0
        if applied:
            # The R2VPO dual step follows applied updates only.
            with self._clock():
                metrics.update(stages.loss.after_update(report))
            metrics["actor/grad_norm"] = float(report.get("grad_norm", math.nan))
            metrics["actor/lr"] = float(report.get("lr", math.nan))
        return metrics

    def _observe(self, gen: Generated, draw: PromptDraw, bins, allocation, signal, bin_weights) -> StepFeedback:
        """Per-prompt outcomes into the store, then every controller learns from the step, once."""
        c, rows, batch = self.c, gen.rows, gen.batch
        # Verdicts as 0/1 "rewards": pass rates, bins and the failure / learnability signals see
        # correctness only (never the overlong penalty); with 1/0 rewards this is the reward itself.
        p_rollouts, p_correct = group_outcomes(gen.correct.double(), batch.group_index, rows.positions.numel(), 0.5)
        c.store.observe(draw.ids[rows.positions], p_rollouts, p_correct)
        self._correct = rows.scatter_prompts(p_correct)
        loss_signal = controller_signal(
            self.setup.prompt_gdro.signal, signal, gen.correct_global, rows.group_index, rows.num_prompts,
            reward_range=(0.0, 1.0), correct_threshold=0.5,
        )
        feedback = StepFeedback(
            draw=draw, bins=bins, allocation=allocation, response_bins=bins[rows.group_index],
            group_index=rows.group_index, rewards=gen.rewards, loss_signal=loss_signal, bin_weights=bin_weights,
        )
        for observer in c.stages.observers:
            observer.observe(feedback)
        return feedback

    def _engine_mismatch(self, batch: RolloutBatch) -> dict[str, float]:
        """The engine's sampled-token log-probs against the actor's (recomputed, or of the training
        forward), over all DP ranks."""
        if batch.engine_logp is None:
            return {}
        if self.behaviour.source == "forward":
            local = self._mismatch_rows
            if not self._forward_ran:  # the same on every rank: the token count that decides it is global
                return {}  # no forward ran this step (no response tokens to train on anywhere)
            if local is None:  # this rank trained only a placeholder row
                local = {k: torch.zeros(0, dtype=torch.float64) for k in MISMATCH_ROWS}
            sums = MismatchSums.from_rows(local)
        else:
            sums = mismatch_sums(batch.behaviour_logp, batch.engine_logp, batch.response_mask)
        total = MismatchSums(self.c.dp.sum(sums.sums), self.c.dp.max(sums.max_abs.reshape(1)).reshape(()))
        return total.finalize().as_metrics()

    # ---------------------------------------------------------------- metrics
    def _step_metrics(self, gen: Generated, feedback: StepFeedback, train_batch: RolloutBatch) -> dict[str, float]:
        """Step-level metrics, global over DP ranks (identical on every rank)."""
        rows, rewards, counts = gen.rows, gen.rewards, feedback.allocation.counts
        tokens, replayed = self.c.dp.total(
            float(gen.batch.response_mask.sum()), float(train_batch.num_rows - gen.batch.num_rows)
        )
        metrics = {
            "train/reward_mean": float(rewards.mean()),
            "train/pass_rate": float((self._correct > 0).double().mean()),
            "train/zero_variance_groups": zero_variance_group_fraction(rewards, rows.group_index, rows.num_prompts),
            "train/rollouts": float(counts.sum()),
            "train/response_tokens": tokens,
            "train/replayed_rows": replayed,
        }
        metrics.update(self._reward_metrics(gen))
        metrics.update(bin_metrics(feedback, self.c.classifier.num_bins))
        for n_val, n_count in zip(*torch.unique(counts, return_counts=True)):
            metrics[f"alloc/n_hist/{int(n_val)}"] = float(n_count)
        return metrics

    def _reward_metrics(self, gen: Generated) -> dict[str, float]:
        """Verification and shaping over all DP ranks: counts summed; ``time/verify_s`` is the slowest
        rank's wall time (under ``time/`` like every wall-clock metric, which run-equality checks skip)."""
        v, dp = gen.verify, self.c.dp
        timeouts, failures, restarts, correct, overlong, truncated = dp.total(
            float(v.timeouts), float(v.failures), float(v.worker_restarts), float(gen.correct.sum()),
            float(gen.overlong.sum()), float(gen.truncated.sum()),
        )
        verify_s = float(dp.max(torch.tensor([v.wall_s], dtype=torch.float64))[0])
        n = max(gen.rows.num_rows, 1)
        return {
            "reward/timeouts": timeouts,
            "reward/failures": failures,
            "reward/worker_restarts": restarts,
            "time/verify_s": verify_s,
            "reward/correct_frac": correct / n,
            "reward/overlong_frac": overlong / n,
            "reward/truncated_frac": truncated / n,
        }


def bin_metrics(feedback: StepFeedback, num_bins: int) -> dict[str, float]:
    """Per-bin prompt share, budget share, mean reward and rollouts per prompt (gdro.md §4)."""
    bins, response_bins, counts = feedback.bins, feedback.response_bins, feedback.allocation.counts
    out: dict[str, float] = {}
    prompt_share = torch.bincount(bins, minlength=num_bins).double() / bins.numel()
    resp_count = torch.bincount(response_bins, minlength=num_bins).double()
    reward_sum = torch.zeros(num_bins, dtype=torch.float64).index_add_(0, response_bins, feedback.rewards.double())
    budget = torch.zeros(num_bins, dtype=torch.float64).index_add_(0, bins, counts.double())
    for b in range(num_bins):
        out[f"bins/prompt_share/{b}"] = float(prompt_share[b])
        out[f"bins/budget_share/{b}"] = float(budget[b] / budget.sum())
        if resp_count[b] > 0:
            out[f"bins/reward_mean/{b}"] = float(reward_sum[b] / resp_count[b])
            out[f"bins/n_per_prompt/{b}"] = float(budget[b] / (prompt_share[b] * bins.numel()))
    return out
