"""One RL step, top to bottom (design.md's diagram)::

    draw prompts -> classify (history up to t-1) -> allocate n_i -> generate
    -> verify (correctness) -> shape rewards (overlong)
    -> group filter (keep groups; more rounds of the above while it asks)
    -> GRPO advantages of the kept groups x stage weights -> behaviour log-probs
    (recomputed by the actor where the training forward cannot supply them,
    :mod:`~nemo_gdro.trainer.behaviour`) -> [+ replayed groups] -> mini-batches:
    optimizer steps (policy-loss stage, token-modulation stage)
    -> weights to the rollout engine -> store + controllers observe -> metrics.

Every stage is called through its protocol (:mod:`nemo_gdro.stages`); rows
of all data-parallel ranks meet in their canonical order
(:class:`~nemo_gdro.parallel.rows.StepRows`). Every decision is a
deterministic function of the run seed, the step and the checkpointed state.

Generation rounds (``algorithm.group_filter``, :mod:`nemo_gdro.stages.group_filter`):
a step generates one round of ``P`` prompts, or more under ``dynamic_sampling``;
each round is drawn, classified, allocated and generated exactly like a step
without rounds (the classifier and the allocators see the history up to the
previous step), seeded by ``(seed, step, round, prompt)``. The filter keeps
some groups of each round; the kept groups keep their rows on the rank that
generated them and are trained in the canonical order (round, position,
rollout) (:meth:`StepRows.build` with an owner map), so mini-batch membership
does not depend on the DP layout. With ``none`` there is one round and every
group is kept: the step is the one-round step, bit for bit.

What the controllers learn from (:meth:`RLStep._observe`, once per ROUND, in
round order): every generated group, trained or not -- the pass-rate store,
the classifier's bins, Prompt-GDRO's scores, Rollout-GDRO's arms and shadow
price, the prompt scheduler. A round is, to them, what a step is without
rounds (a draw, its plan, its outcomes), so a step of ``K`` rounds advances
each controller ``K`` times. The per-response loss signal of a row that was
not trained (a dropped group) is the surrogate at the behaviour policy
(ratio 1): ``-A`` (token mean; 0 for a zero-variance group, and 0 for a
truncated row under ``reward.mask_truncated``), the value the update guard
also uses for a skipped update; the KL term of ``signal_include_kl`` is not
added there. Trained rows carry their surrogate from the optimizer steps as
before. Observer diagnostics describe the last round (the only one unless
``dynamic_sampling``): the one the controllers observed last.

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
from dataclasses import dataclass, replace
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
from nemo_gdro.stages import Allocation, MinibatchView, PromptDraw, StepFeedback
from nemo_gdro.stages.group_filter import NoFilter, informative_groups
from nemo_gdro.stages.signal import controller_signal
from nemo_gdro.trainer.behaviour import behaviour_plan
from nemo_gdro.trainer.diagnostics import modulation_extremes
from nemo_gdro.trainer.guards import UpdateGuard, sampling_failure
from nemo_gdro.trainer.rl_loss import MinibatchLoss

__all__ = ["ControllerClock", "RLStep", "Round", "Trained"]

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


@dataclass
class Round:
    """One generation round of a step: its plan, its rollouts and the groups kept for training."""

    draw: PromptDraw
    bins: torch.Tensor  # int64 [P] difficulty bins the round was planned with
    allocation: Allocation
    gen: Generated
    informative: torch.Tensor  # bool [P] groups whose shaped rewards are not all equal
    keep: torch.Tensor  # bool [P] groups the step trains on


@dataclass
class Trained:
    """The groups a step trains on, over all its rounds, in canonical (round, position, rollout) order.

    ``gen.rows`` is their global layout (each group stays on the rank that
    generated it); ``draw.ids`` / ``bins`` / ``counts`` are per kept prompt ``[P_kept]``.
    """

    gen: Generated
    draw: PromptDraw
    bins: torch.Tensor
    counts: torch.Tensor


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
        self._plan_s = self._generate_s = 0.0
        t0 = time.perf_counter()
        rounds = self._generate_rounds(step)
        trained = self._trained(rounds)
        gen = trained.gen
        # Decided from global counts: the same on every rank. Nothing kept anywhere: no update.
        any_trained = gen.rows.num_rows > 0
        if any_trained:
            raw_adv, bin_weights = self._advantages(gen, trained.draw, trained.bins)
        else:
            raw_adv, bin_weights = torch.zeros(0, dtype=torch.float32), None
            gen.batch.advantages = raw_adv.clone()
        t_behaviour = time.perf_counter()
        batch = gen.batch
        if any_trained and batch.num_rows == 0:
            # Other ranks train: this one joins every collective with a row that has no loss token.
            batch, raw_adv = _placeholder_row(rounds), torch.zeros(1, dtype=torch.float32)
        if any_trained and self.behaviour.separate_pass:
            batch.behaviour_logp = c.actor.compute_token_stats(batch.tokens, lengths=batch.sequence_lengths)["logp"].detach()
        elif any_trained and self.behaviour.source == "current":  # filled row by row from the mini-batch's current-policy pass
            batch.behaviour_logp = torch.zeros(batch.num_rows, batch.seq_len - 1, dtype=torch.float32)
        # The engine-vs-actor mismatch of the training forward, per row (behaviour source "forward").
        self._mismatch_rows: dict[str, torch.Tensor] | None = None
        self._forward_ran = False
        t_train = time.perf_counter()
        if any_trained:
            train_batch, raw_all = c.replay.mix(batch, raw_adv, step)
            actor_metrics, signal = self._optimize(train_batch, raw_all, gen.rows, step)
            actor_metrics.update(self._engine_mismatch(batch))
        else:
            train_batch, signal = batch, torch.zeros(0, dtype=torch.float64)
            actor_metrics = {"actor/optimizer_steps": 0.0, "guard/skipped_total": float(self.guard.skipped_total)}
        actor_metrics["actor/behaviour_pass"] = 1.0 if any_trained and self.behaviour.separate_pass else 0.0
        t_push = time.perf_counter()

        c.engine.load_weights(c.actor.export_hf_state_dict(), version=step + 1)
        t_pushed = time.perf_counter()
        with clock():
            feedbacks = [
                self._observe(r.gen, r.draw, r.bins, r.allocation, round_signal, bin_weights)
                for r, round_signal in zip(rounds, self._round_signals(rounds, signal), strict=True)
            ]
        c.verify_replicated(step, {
            "bins": torch.cat([r.bins for r in rounds]),
            "counts": torch.cat([r.allocation.counts for r in rounds]),
            "keep": torch.cat([r.keep for r in rounds]),
        })

        metrics = self._step_metrics(rounds, trained, feedbacks, train_batch, batch)
        metrics.update(actor_metrics)
        for observer in stages.observers:
            metrics.update(observer.diagnostics(feedbacks[-1]))  # the round each observed last
        metrics.update(
            {
                # time/verify_s (the verifier's own wall time) comes with the reward metrics.
                "time/plan_s": self._plan_s,
                "time/generate_s": self._generate_s,
                "time/behaviour_s": t_train - t_behaviour,
                "time/train_s": t_push - t_train,
                "time/weight_push_s": t_pushed - t_push,
                "time/controllers_ms": 1e3 * clock.seconds,
                "time/step_s": time.perf_counter() - t0,
            }
        )
        self.last = gen  # the trained groups, kept for inspection (tests, debugging); replaced every step
        self.last_rounds = rounds
        self.last_bins = trained.bins
        self.last_draw = trained.draw
        return metrics

    # ----------------------------------------------------------------- stages
    def _generate_rounds(self, step: int) -> list[Round]:
        """Draw, classify, allocate and generate rounds of ``P`` prompts while the group filter asks for more."""
        c, stages = self.c, self.c.stages
        group_filter = stages.group_filter if stages.group_filter is not None else NoFilter()
        rounds: list[Round] = []
        kept = 0
        while True:
            start = time.perf_counter()
            with self._clock():
                draw = stages.prompts.draw(self.num_prompts)
                bins = c.classifier.classify(draw.ids)
                allocation = stages.rollouts.allocate(draw, bins)
            self._plan_s += time.perf_counter() - start
            gen = self._generate(draw, allocation.counts, step, len(rounds))
            # Global rewards: every rank decides the same.
            informative = informative_groups(gen.rewards, gen.rows.group_index, gen.rows.num_prompts)
            with self._clock():
                keep = group_filter.select(informative, kept, self.num_prompts)
            kept += int(keep.sum())
            rounds.append(Round(draw, bins, allocation, gen, informative, keep))
            if not group_filter.another_round(kept, self.num_prompts, len(rounds)):
                return rounds

    def _generate(self, draw: PromptDraw, counts: torch.Tensor, step: int, round: int = 0) -> Generated:
        """This rank's prompts of one round through the engine and the verifier; rewards assembled globally."""
        c = self.c
        mine = c.dp.my_positions(self.num_prompts)
        records = c.task.train.get_many(draw.ids[mine])
        # Seeds of the whole round's prompt list, then this rank's slice: rollouts do not depend on the layout.
        seeds = prompt_seeds(self.seed, step, draw.ids, round)
        start = time.perf_counter()
        try:
            batch = c.engine.generate(records, counts[mine], seeds[mine])
        except RuntimeError as err:
            raise (sampling_failure(err, step + 1, "generation") or err) from err
        self._generate_s += time.perf_counter() - start  # the engine alone (verification: time/verify_s)
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

    def _trained(self, rounds: list[Round]) -> Trained:
        """The kept groups of every round as one step batch: this rank's rows, the global layout.

        A round that keeps every group and is the step's only round is used as
        it is (``group_filter=none``: the one-round step, bit for bit).
        """
        first = rounds[0]
        if len(rounds) == 1 and bool(first.keep.all()):
            return Trained(first.gen, first.draw, first.bins, first.allocation.counts)
        dp = self.c.dp
        parts: list[RolloutBatch] = []
        counts, owners, ids, bins, rewards, correct_global = [], [], [], [], [], []
        correct, overlong, truncated = [], [], []
        for r in rounds:
            g = r.gen
            global_keep = r.keep[g.rows.group_index]  # [R] rows of kept groups, canonical order
            local_keep = r.keep[g.rows.positions[g.batch.group_index]]  # [R_local]
            if bool(local_keep.any()):
                parts.append(g.batch.select(local_keep))
            kept = torch.nonzero(r.keep).flatten()
            counts.append(r.allocation.counts[kept])
            owners.append(dp.owner_of(kept))  # the rank that generated the group
            ids.append(r.draw.ids[kept])
            bins.append(r.bins[kept])
            rewards.append(g.rewards[global_keep])
            correct_global.append(g.correct_global[global_keep])
            correct.append(g.correct[local_keep])
            overlong.append(g.overlong[local_keep])
            truncated.append(g.truncated[local_keep])
        batch = RolloutBatch.concat(parts) if parts else first.gen.batch.select(torch.zeros(0, dtype=torch.int64))
        all_counts = torch.cat(counts)
        rows = StepRows.build(all_counts, batch.group_index, dp, owners=torch.cat(owners))
        if rows.positions.numel() != batch.num_prompts:
            raise RuntimeError(
                f"kept groups: {batch.num_prompts} local prompts but the layout assigns {rows.positions.numel()}"
            )
        gen = Generated(
            batch, rows, torch.cat(rewards), correct=torch.cat(correct), correct_global=torch.cat(correct_global),
            verify=first.gen.verify, overlong=torch.cat(overlong), truncated=torch.cat(truncated),
        )
        draw = replace(first.draw, ids=torch.cat(ids), new_epoch=any(r.draw.new_epoch for r in rounds))
        return Trained(gen, draw, torch.cat(bins), all_counts)

    def _round_signals(self, rounds: list[Round], signal: torch.Tensor) -> list[torch.Tensor]:
        """Per-round loss signals float64 ``[R_k]`` from the trained rows' signal ``[R_kept]``.

        A row that was not trained gets its surrogate at the behaviour policy
        (ratio 1): ``-A`` (token mean), 0 for a truncated row under
        ``reward.mask_truncated`` (no loss, as when trained).
        """
        out: list[torch.Tensor] = []
        offset = 0
        for r in rounds:
            g = r.gen
            global_keep = r.keep[g.rows.group_index]
            n = int(global_keep.sum())
            if n == g.rows.num_rows:
                out.append(signal[offset : offset + n])
            else:
                raw = grpo_advantages(g.rewards, g.rows.group_index, g.rows.num_prompts, self.setup.advantage)
                fill = 0.0 - raw.to(torch.float64)
                if self.mask_truncated and g.batch.truncated is not None:
                    fill[g.rows.scatter(g.batch.truncated.double()) > 0] = 0.0
                fill[global_keep] = signal[offset : offset + n]
                out.append(fill)
            offset += n
        if offset != signal.numel():
            raise RuntimeError(f"{signal.numel()} trained rows but the rounds kept {offset}")
        return out

    def _advantages(self, gen: Generated, draw: PromptDraw, bins: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """GRPO advantages of this rank's rows (each prompt's rows live on one rank) times the stages' weights."""
        stages, batch, rows = self.c.stages, gen.batch, gen.rows
        # From the global rewards, which every rank holds: no collective; this rank's rows are a gather.
        raw_global = grpo_advantages(gen.rewards, rows.group_index, rows.num_prompts, self.setup.advantage)
        raw = raw_global[rows.canon]
        response_bins = bins[rows.group_index]
        informative = raw_global != 0  # [R] canonical order (normalize_over: informative)
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
    def _step_metrics(
        self, rounds: list[Round], trained: Trained, feedbacks: list[StepFeedback], train_batch: RolloutBatch,
        fresh_batch: RolloutBatch,
    ) -> dict[str, float]:
        """Step-level metrics, global over DP ranks (identical on every rank).

        ``train/reward_mean``, ``train/pass_rate`` (share of prompts with a correct
        rollout), ``train/zero_variance_groups``, ``train/rollouts`` (=
        ``train/kept_rollouts``) and ``train/response_tokens`` describe the TRAINED
        groups (with ``group_filter=none``: every generated group). Of every
        GENERATED group, all rounds: ``train/generated_rollouts``,
        ``train/generation_rounds``, ``train/informative_groups`` (groups whose
        shaped rewards are not all equal), ``train/informative_rollout_share`` and
        ``train/informative_token_share`` (rollouts / response tokens in those
        groups over all generated), the ``reward/*`` verifier counts, the ``bins/*``
        shares and ``alloc/n_hist``. ``train/distinct_prompts``: distinct prompt ids
        among the trained prompts.
        """
        gen, dp = trained.gen, self.c.dp
        rows, rewards, counts = gen.rows, gen.rewards, trained.counts
        generated_counts = torch.cat([r.allocation.counts for r in rounds])
        informative_rollouts = sum(int(r.allocation.counts[r.informative].sum()) for r in rounds)
        generated_tokens = informative_tokens = 0.0
        for r in rounds:
            row_tokens = r.gen.batch.response_mask.sum(-1)
            row_informative = r.informative[r.gen.rows.positions[r.gen.batch.group_index]]
            generated_tokens += float(row_tokens.sum())
            informative_tokens += float(row_tokens[row_informative].sum())
        tokens, replayed, generated_tokens, informative_tokens = dp.total(
            float(gen.batch.response_mask.sum()), float(train_batch.num_rows - fresh_batch.num_rows),
            generated_tokens, informative_tokens,
        )
        _, p_correct = group_outcomes(gen.correct_global, rows.group_index, rows.num_prompts, 0.5)
        generated = float(generated_counts.sum())
        metrics = {
            "train/reward_mean": float(rewards.mean()) if rewards.numel() else math.nan,
            "train/pass_rate": float((p_correct > 0).double().mean()) if rows.num_prompts else math.nan,
            "train/zero_variance_groups": zero_variance_group_fraction(rewards, rows.group_index, rows.num_prompts),
            "train/rollouts": float(counts.sum()),
            "train/response_tokens": tokens,
            "train/replayed_rows": replayed,
            "train/generated_rollouts": generated,
            "train/kept_rollouts": float(rows.num_rows),
            "train/generation_rounds": float(len(rounds)),
            "train/informative_groups": float(sum(int(r.informative.sum()) for r in rounds)),
            "train/informative_rollout_share": informative_rollouts / generated if generated else math.nan,
            "train/informative_token_share": informative_tokens / generated_tokens if generated_tokens else math.nan,
            "train/distinct_prompts": float(torch.unique(trained.draw.ids).numel()),
        }
        metrics.update(self._reward_metrics(rounds))
        metrics.update(bin_metrics(_merge_feedback(feedbacks), self.c.classifier.num_bins))
        for n_val, n_count in zip(*torch.unique(generated_counts, return_counts=True)):
            metrics[f"alloc/n_hist/{int(n_val)}"] = float(n_count)
        return metrics

    def _reward_metrics(self, rounds: list[Round]) -> dict[str, float]:
        """Verification and shaping of every generated row (all rounds) over all DP ranks: counts summed;
        ``time/verify_s`` is the slowest rank's wall time (under ``time/`` like every wall-clock metric,
        which run-equality checks skip)."""
        dp = self.c.dp
        gens = [r.gen for r in rounds]
        timeouts, failures, restarts, correct, overlong, truncated = dp.total(
            sum(float(g.verify.timeouts) for g in gens), sum(float(g.verify.failures) for g in gens),
            sum(float(g.verify.worker_restarts) for g in gens), sum(float(g.correct.sum()) for g in gens),
            sum(float(g.overlong.sum()) for g in gens), sum(float(g.truncated.sum()) for g in gens),
        )
        wall_s = sum(g.verify.wall_s for g in gens)
        verify_s = float(dp.max(torch.tensor([wall_s], dtype=torch.float64))[0])
        n = max(sum(g.rows.num_rows for g in gens), 1)
        return {
            "reward/timeouts": timeouts,
            "reward/failures": failures,
            "reward/worker_restarts": restarts,
            "time/verify_s": verify_s,
            "reward/correct_frac": correct / n,
            "reward/overlong_frac": overlong / n,
            "reward/truncated_frac": truncated / n,
        }


def _merge_feedback(feedbacks: list[StepFeedback]) -> StepFeedback:
    """The rounds' feedback as one (prompt positions of later rounds follow those of earlier ones), for the bin metrics."""
    if len(feedbacks) == 1:
        return feedbacks[0]
    offsets = [0]
    for f in feedbacks[:-1]:
        offsets.append(offsets[-1] + f.bins.numel())
    first = feedbacks[0]
    return StepFeedback(
        draw=replace(first.draw, ids=torch.cat([f.draw.ids for f in feedbacks])),
        bins=torch.cat([f.bins for f in feedbacks]),
        allocation=Allocation(torch.cat([f.allocation.counts for f in feedbacks])),
        response_bins=torch.cat([f.response_bins for f in feedbacks]),
        group_index=torch.cat([f.group_index + off for f, off in zip(feedbacks, offsets, strict=True)]),
        rewards=torch.cat([f.rewards for f in feedbacks]),
        loss_signal=torch.cat([f.loss_signal for f in feedbacks]),
        bin_weights=first.bin_weights,
    )


def bin_metrics(feedback: StepFeedback, num_bins: int) -> dict[str, float]:
    """Per-bin prompt share, budget share, mean reward and rollouts per prompt (gdro.md §4), of the generated groups."""
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


def _placeholder_row(rounds: list[Round]) -> RolloutBatch:
    """One of this rank's generated rows with its response removed (no token enters the loss).

    A rank whose groups were all dropped while other ranks train joins the
    step's collective updates with it; rows after the step's kept rows are not
    part of the layout (:class:`StepRows`), so it is counted nowhere.
    """
    source = next((r.gen.batch for r in rounds if r.gen.batch.num_rows > 0), None)
    if source is None:
        raise RuntimeError("this data-parallel rank generated no rows (trainer.prompts_per_step < DP size?)")
    row = source.select(torch.zeros(1, dtype=torch.int64))
    tokens = row.tokens.clone()
    tokens[0, int(row.prompt_lengths[0]) :] = row.pad_id
    empty = torch.zeros(1, dtype=torch.int64)
    placeholder = replace(
        row, tokens=tokens, response_lengths=empty, response_mask=torch.zeros_like(row.response_mask),
        responses=[""], rewards=torch.zeros(1, dtype=torch.float32), advantages=torch.zeros(1, dtype=torch.float32),
        truncated=None if row.truncated is None else torch.zeros(1, dtype=torch.bool),
        engine_logp=None if row.engine_logp is None else torch.zeros_like(row.engine_logp),
    )
    return placeholder.validate()
