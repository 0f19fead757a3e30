"""``algorithm.group_filter`` in real tiny runs (Megatron actor, HF engine, verifier, controllers).

The tiny model answers (almost) nothing right, so correctness alone gives only
zero-variance groups; the DAPO overlong penalty (``reward.overlong``, a buffer
of 3 of the 4 new tokens) makes the SHAPED rewards of a group differ when its
responses differ in length, which gives a mix of informative and
zero-variance groups -- and checks that the filter reads the shaped rewards.
"""

import json
import math

import pytest
import torch

from nemo_gdro.stages.group_filter import informative_groups
from nemo_gdro.trainer.config import compose
from nemo_gdro.trainer.loop import Trainer

TINY = [
    "sft.steps=0",
    "data.num_train=48",
    "data.num_eval=6",
    "trainer.prompts_per_step=4",
    "rollout.n=4",
    "eval.k=2",
    "rollout.max_new_tokens=4",
    "trainer.eval_every=0",
    "trainer.checkpoint_every=0",
    "trainer.micro_batch_size=8",
    "logging.tensorboard=false",
    "logging.progress=false",
    "eval.at_start=false",
    "eval.at_end=false",
    # Controllers that learn from every generated group.
    "algorithm.advantage_weighting=prompt_gdro",
    "algorithm.rollout_scheduler=rollout_gdro",
    "algorithm.rollout_gdro.mode=bandit",
]
SHAPED = ["reward.overlong.enabled=true", "reward.overlong.buffer_tokens=3"]


def _rows(path):
    return {r["step"]: r for r in map(json.loads, path.read_text().splitlines()) if r["step"] > 0}


def _weights(trainer):
    return {k: v.clone() for k, v in trainer.components.actor.export_hf_state_dict().items()}


def _check_trained_layout(step):
    """The trained batch is the kept groups of every round, in (round, position) order, rows with their prompt."""
    rounds, trained = step.last_rounds, step.last
    ids = torch.cat([r.draw.ids[r.keep] for r in rounds])
    assert torch.equal(trained.batch.step_prompt_ids, ids)
    assert torch.equal(trained.rows.counts, torch.cat([r.allocation.counts[r.keep] for r in rounds]))
    # Every trained group is informative by its own shaped rewards, which are the rounds' rewards of those rows.
    assert informative_groups(trained.rewards, trained.rows.group_index, trained.rows.num_prompts).all()
    assert torch.equal(trained.rewards, torch.cat([r.gen.rewards[r.keep[r.gen.rows.group_index]] for r in rounds]))
    assert torch.equal(trained.batch.rewards, trained.rewards)  # one rank: local rows are the canonical rows
    return ids


@pytest.mark.slow
def test_filter_trains_exactly_the_informative_groups_and_controllers_see_every_group(tmp_path):
    with Trainer(compose(overrides=[*TINY, *SHAPED, "algorithm.group_filter=filter", f"run.output_dir={tmp_path}"])) as t:
        c, step = t.components, t.rl_step
        t._push_weights()
        seen, partial = 0, False
        for s in range(3):
            before = _weights(t)
            m = step(s)
            (r,) = step.last_rounds  # no refill: one round
            assert torch.equal(r.keep, r.informative)
            assert torch.equal(r.informative, informative_groups(r.gen.rewards, r.gen.rows.group_index, 4))
            ids = _check_trained_layout(step)
            kept = int(r.allocation.counts[r.informative].sum())
            assert m["train/generated_rollouts"] == 16 and m["train/generation_rounds"] == 1
            assert m["train/kept_rollouts"] == m["train/rollouts"] == kept
            assert m["train/informative_groups"] == int(r.informative.sum())
            assert m["train/informative_rollout_share"] == kept / 16
            assert m["train/zero_variance_groups"] == 0.0  # of the trained groups
            assert m["train/distinct_prompts"] == torch.unique(ids).numel()
            changed = any(not torch.equal(before[k], v) for k, v in _weights(t).items())
            assert changed == (kept > 0)  # an update exactly when something was kept
            partial |= 0 < kept < 16
            seen += 16
            # The pass-rate store credited every generated rollout, trained or not; each controller learnt once.
            assert float(c.store.state_dict()["rollouts"].sum()) == seen
            stateful = c.stateful()
            assert stateful["rollout_gdro"].obj.num_updates == s + 1
            assert stateful["prompt_gdro"].obj.num_updates == s + 1
        assert partial, "no step dropped some but not all groups: the test would mean little"
        assert 0 < m["train/informative_token_share"] <= 1


@pytest.mark.slow
def test_dynamic_sampling_fills_the_step_from_more_rounds(tmp_path):
    overrides = [*TINY, *SHAPED, "algorithm.group_filter=dynamic_sampling",
                 "algorithm.dynamic_sampling.max_generation_batches=3", f"run.output_dir={tmp_path}"]
    with Trainer(compose(overrides=overrides)) as t:
        c, step = t.components, t.rl_step
        t._push_weights()
        rounds_total = generated_total = 0
        refilled = False
        for s in range(3):
            m = step(s)
            rounds = step.last_rounds
            informative = torch.cat([r.informative for r in rounds])
            keep = torch.cat([r.keep for r in rounds])
            # The first P informative groups in (round, position) order, fewer only at the cap.
            first = torch.nonzero(informative).flatten()[:4]
            assert torch.nonzero(keep).flatten().tolist() == first.tolist()
            assert len(rounds) <= 3 and (int(keep.sum()) == 4 or len(rounds) == 3)
            assert int(keep[:-4].sum()) < 4  # no round was drawn after the step was filled
            _check_trained_layout(step)
            generated = sum(int(r.allocation.counts.sum()) for r in rounds)
            assert m["train/generated_rollouts"] == generated >= m["train/kept_rollouts"] == m["train/rollouts"]
            assert m["train/generation_rounds"] == len(rounds)
            assert m["train/informative_groups"] == int(informative.sum())
            # Later rounds draw the sampler's next prompts, with their own seeds.
            all_ids = torch.cat([r.draw.ids for r in rounds])
            assert torch.unique(all_ids).numel() == all_ids.numel()
            refilled |= len(rounds) > 1
            rounds_total += len(rounds)
            generated_total += generated
            # Every generated group reached the store and the controllers, once per round.
            assert float(c.store.state_dict()["rollouts"].sum()) == generated_total
            assert c.stateful()["rollout_gdro"].obj.num_updates == rounds_total
            assert c.stateful()["prompt_gdro"].obj.num_updates == rounds_total
            assert m["bins/prompt_share/0"] + sum(m.get(f"bins/prompt_share/{b}", 0.0) for b in range(1, 10)) == (
                pytest.approx(1.0)
            )
        assert refilled, "no step needed a second round: the test would not exercise the refill"


@pytest.mark.slow
def test_dynamic_sampling_stops_at_the_cap_and_a_step_with_nothing_to_train_makes_no_update(tmp_path):
    """Unshaped 0/1 rewards of an untrained model: every group is zero-variance, so every step runs the
    cap's rounds, keeps nothing, applies no update and still counts."""
    overrides = [*TINY, "algorithm.group_filter=dynamic_sampling", "algorithm.dynamic_sampling.max_generation_batches=2",
                 "trainer.max_steps=2", f"run.output_dir={tmp_path}"]
    with Trainer(compose(overrides=overrides)) as t:
        before = _weights(t)
        assert t.run().steps_done == 2
        after = _weights(t)
        stateful = t.components.stateful()
        assert stateful["rollout_gdro"].obj.num_updates == 4 and stateful["prompt_gdro"].obj.num_updates == 4
    for key, value in before.items():
        assert torch.equal(value, after[key]), key
    rows = _rows(tmp_path / "metrics.jsonl")
    assert set(rows) == {1, 2}
    for r in rows.values():
        assert r["train/informative_groups"] == 0, "the untrained model solved something: precondition broken"
        assert r["train/generation_rounds"] == 2 and r["train/generated_rollouts"] == 32
        assert r["train/kept_rollouts"] == r["train/rollouts"] == 0 and r["train/distinct_prompts"] == 0
        assert r["train/reward_mean"] is None and "actor/loss" not in r  # nothing trained: no loss
        assert r["guard/skipped_total"] == 0 and r["actor/behaviour_pass"] == 0 and r["actor/optimizer_steps"] == 0
        assert r["reward/correct_frac"] == 0.0 and r["train/informative_rollout_share"] == 0.0


RESUME = [*TINY, *SHAPED, "algorithm.group_filter=dynamic_sampling", "algorithm.dynamic_sampling.max_generation_batches=3",
          "algorithm.loss=r2vpo", "trainer.checkpoint_every=2", "checkpoint.at_end=false"]


@pytest.mark.slow
def test_dynamic_sampling_resumes_with_the_same_decisions(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    with Trainer(compose(overrides=[*RESUME, "trainer.max_steps=4", f"run.output_dir={straight}"])) as a:
        a.run()
        weights_a = _weights(a)
        state_a = {n: i.obj.state_dict() for n, i in a.components.stateful().items() if i.scope != "model"}
    with Trainer(compose(overrides=[*RESUME, "trainer.max_steps=2", f"run.output_dir={split}"])) as b:
        b.run()
    with Trainer(compose(overrides=[*RESUME, "trainer.max_steps=4", f"run.output_dir={split}", "run.resume=auto"])) as c:
        c.run()
        assert c.step == 4
        weights_c = _weights(c)
        state_c = {n: i.obj.state_dict() for n, i in c.components.stateful().items() if i.scope != "model"}
    rows_a, rows_c = _rows(straight / "metrics.jsonl"), _rows(split / "metrics.jsonl")
    assert sum(rows_a[s]["train/generation_rounds"] for s in (1, 2, 3, 4)) > 4, "no refill: the resume checks little"
    for s in (3, 4):
        for key, value in rows_a[s].items():
            if not key.startswith("time/"):
                assert rows_c[s][key] == value or (value is None and rows_c[s][key] is None), (s, key)
    for key, value in weights_a.items():
        assert torch.equal(value, weights_c[key]), key
    assert state_a["sampler"] == state_c["sampler"]  # the rounds' draws advanced the scheduler alike
    assert torch.equal(state_a["rollout_gdro"]["scores"], state_c["rollout_gdro"]["scores"])
    assert state_a["rollout_gdro"]["next_plan_id"] == state_c["rollout_gdro"]["next_plan_id"]
    assert torch.equal(state_a["prompt_gdro"]["scores"], state_c["prompt_gdro"]["scores"])
    assert torch.equal(state_a["prompt_stats"]["rollouts"], state_c["prompt_stats"]["rollouts"])
    assert state_a["dual"] == state_c["dual"]
    assert math.isfinite(rows_a[4]["train/informative_rollout_share"])
