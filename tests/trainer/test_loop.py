"""End-to-end runs of the real loop: Megatron actor, HF engine, verifier, controllers."""

import json
import math

import pytest
import torch

from nemo_gdro.algorithms.advantages import grpo_advantages
from nemo_gdro.trainer.config import compose
from nemo_gdro.trainer.loop import Trainer

TINY = [
    "sft.steps=4",
    "sft.batch_size=8",
    "trainer.max_steps=2",
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
]

CASES = {
    "grpo": [],
    "prompt_gdro_weight": ["algorithm.advantage_weighting=prompt_gdro"],
    "prompt_gdro_weight_informative": [
        "algorithm.advantage_weighting=prompt_gdro",
        "algorithm.prompt_gdro.normalize_over=informative",
    ],
    "prompt_gdro_resample": [
        "algorithm.prompt_scheduler=prompt_gdro_resample",
        "algorithm.prompt_gdro.importance_correct=true",
    ],
    "rollout_gdro_sqrt": ["algorithm.rollout_scheduler=rollout_gdro"],
    "rollout_gdro_bandit": ["algorithm.rollout_scheduler=rollout_gdro", "algorithm.rollout_gdro.mode=bandit"],
    "dynamo": [
        "algorithm.rollout_scheduler=dynamo",
        "algorithm.dynamo.allocation.n_min=2",
        "algorithm.dynamo.allocation.n_max=8",
        "algorithm.token_modulation=dynamo",
    ],
    "r2vpo_replay": ["algorithm.loss=r2vpo", "algorithm.replay.ratio=1.0"],
    "all_together": [
        "algorithm.advantage_weighting=prompt_gdro",
        "algorithm.rollout_scheduler=rollout_gdro",
        "algorithm.rollout_gdro.mode=bandit",
        "algorithm.token_modulation=dynamo",
        "algorithm.loss=r2vpo",
        "algorithm.replay.ratio=0.5",
        "algorithm.policy_loss.kl_coef=0.01",
    ],
}


def read_metrics(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def controller_state(trainer):
    """Every checkpointed component's state, by checkpoint name."""
    return {name: item.obj.state_dict() for name, item in trainer.components.stateful().items() if item.scope != "model"}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_smoke_run(case, tmp_path):
    cfg = compose(overrides=TINY + CASES[case] + [f"run.output_dir={tmp_path}"])
    with Trainer(cfg) as trainer:
        result = trainer.run()
        rows = {r["step"]: r for r in read_metrics(tmp_path / "metrics.jsonl")}
        assert result.steps_done == 2 and {1, 2} <= set(rows)
        for step in (1, 2):
            assert rows[step]["train/rollouts"] == 16  # compute neutral: P * n_bar every step
            assert math.isfinite(rows[step]["actor/loss"])
        assert (tmp_path / "checkpoints" / "step_00000002" / "manifest.json").exists()
        assert any((tmp_path / "plots").glob("*.png"))
        # Both engines hold the policy as trained, not a stale copy.
        c = trainer.components
        trained = c.actor.export_hf_state_dict()
        for engine in (c.engine, c.eval_engine):
            held = engine.model.state_dict()
            for key, value in trained.items():
                assert torch.equal(held[key], value), key
        stateful = c.stateful()
        state = controller_state(trainer)
        assert float(state["prompt_stats"]["rollouts"].sum()) == 32  # two steps of 16 rollouts, credited once
        if "prompt_gdro" in stateful:
            assert "prompt_gdro/q/0" in rows[2] and stateful["prompt_gdro"].obj.num_updates == 2
        if trainer.cfg.algorithm.advantage_weighting == "prompt_gdro":
            for step in (1, 2):
                r = rows[step]
                present = [r[f"prompt_gdro/weight/{b}"] for b in range(10) if r[f"prompt_gdro/response_share/{b}"] > 0]
                absent = [r[f"prompt_gdro/weight/{b}"] for b in range(10) if r[f"prompt_gdro/response_share/{b}"] == 0]
                assert absent and all(w is None for w in absent)  # NaN in the step, null in the file
                assert r["prompt_gdro/weight_min"] == min(present) and r["prompt_gdro/weight_max"] == max(present)
                assert 0.0 <= r["prompt_gdro/effective_bin_mass"] <= 1.0
        if trainer.cfg.algorithm.prompt_scheduler == "prompt_gdro_resample":
            assert abs(sum(rows[2][f"prompt_gdro/draw_p/{b}"] for b in range(10)) - 1.0) < 1e-9
            assert trainer.rl_step.last_draw.ids.unique().numel() == 4  # resample_base=data: no repeats in a step
        if "rollout_gdro" in stateful:
            assert "rollout_gdro/mu" in rows[2] and stateful["rollout_gdro"].obj.num_updates == 2
        if "dual" in stateful:
            assert rows[2]["r2vpo/lambda"] >= 0
        if "replay" in stateful:
            assert rows[2]["train/replayed_rows"] > 0
        if trainer.cfg.algorithm.token_modulation == "dynamo":
            assert 0.0 < rows[2]["dynamo/beta_stab/mean"] <= 1.0


@pytest.mark.slow
def test_bf16_parameters_train_end_to_end(tmp_path):
    """model.dtype=bfloat16 on CPU (Megatron's mixed-precision optimizer through the CPU shim):
    one RL step, and both engines hold the trained bf16 weights."""
    cfg = compose(overrides=TINY + ["model.dtype=bfloat16", "sft.steps=0", "trainer.max_steps=1",
                                    f"run.output_dir={tmp_path}"])
    with Trainer(cfg) as trainer:
        assert trainer.run().steps_done == 1
        row = read_metrics(tmp_path / "metrics.jsonl")[-1]
        assert math.isfinite(row["actor/loss"])
        c = trainer.components
        assert c.actor.module.embedding.word_embeddings.weight.dtype == torch.bfloat16
        trained = c.actor.export_hf_state_dict()
        for engine in (c.engine, c.eval_engine):
            held = engine.model.state_dict()
            for key, value in trained.items():
                assert torch.equal(held[key], value.to(held[key].dtype)), key


RESUME_CASE = TINY + [
    "algorithm.advantage_weighting=prompt_gdro",
    "algorithm.rollout_scheduler=rollout_gdro",
    "algorithm.rollout_gdro.mode=bandit",
    "algorithm.loss=r2vpo",
    "algorithm.replay.ratio=0.5",
    "trainer.checkpoint_every=2",
]


@pytest.mark.slow
def test_resume_repeats_the_uninterrupted_run(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    with Trainer(compose(overrides=RESUME_CASE + ["trainer.max_steps=4", f"run.output_dir={straight}"])) as a:
        a.run()
        weights_a = {k: v.clone() for k, v in a.components.actor.export_hf_state_dict().items()}
        state_a = controller_state(a)
    with Trainer(compose(overrides=RESUME_CASE + ["trainer.max_steps=2", f"run.output_dir={split}"])) as b:
        b.run()
    with Trainer(compose(overrides=RESUME_CASE + ["trainer.max_steps=4", f"run.output_dir={split}", "run.resume=auto"])) as c:
        c.run()
        assert c.step == 4
        weights_c = c.components.actor.export_hf_state_dict()
        state_c = controller_state(c)
    rows_a = {r["step"]: r for r in read_metrics(straight / "metrics.jsonl")}
    rows_c = {r["step"]: r for r in read_metrics(split / "metrics.jsonl")}
    for step in (3, 4):
        for key, value in rows_a[step].items():
            if not key.startswith("time/"):
                assert rows_c[step][key] == value, (step, key)
    for key in weights_a:
        assert torch.equal(weights_a[key], weights_c[key]), key
    for name in ("window_bits", "rollouts", "correct", "last_bin"):
        assert torch.equal(state_a["prompt_stats"][name], state_c["prompt_stats"][name])
    assert torch.equal(state_a["prompt_gdro"]["scores"], state_c["prompt_gdro"]["scores"])
    assert torch.equal(state_a["rollout_gdro"]["scores"], state_c["rollout_gdro"]["scores"])
    assert state_a["rollout_gdro"]["mu"] == state_c["rollout_gdro"]["mu"]
    assert state_a["dual"] == state_c["dual"]
    assert len(state_a["replay"]["groups"]) == len(state_c["replay"]["groups"])


@pytest.mark.slow
def test_rows_are_scored_against_their_own_prompt_with_variable_n(tmp_path):
    overrides = TINY + [
        f"run.output_dir={tmp_path}",
        "trainer.prompts_per_step=8",
        "algorithm.rollout_scheduler=dynamo",
        "algorithm.dynamo.allocation.n_min=1",
        "algorithm.dynamo.allocation.n_max=8",
        "algorithm.dynamo.allocation.warmup=1",
    ]
    with Trainer(compose(overrides=overrides)) as trainer:
        c = trainer.components
        train_ds, verifier = c.task.train, c.task.verifier
        # Give the prompts distinct histories so DynaMO hands out different n_i.
        ids = torch.arange(len(train_ds))
        c.store.observe(ids, torch.full_like(ids, 16), ids % 17)
        trainer._push_weights()
        trainer.rl_step(0)
        batch = trainer.rl_step.last.batch
        sizes = torch.bincount(batch.group_index, minlength=batch.num_prompts)
        assert sizes.unique().numel() > 1, "the allocation should be ragged for this test to mean anything"
        for r in range(batch.num_rows):
            record = train_ds[int(batch.prompt_ids[r])]
            assert batch.answers[r] == record.answer
            assert int(batch.step_prompt_ids[batch.group_index[r]]) == int(batch.prompt_ids[r])
            assert batch.rewards[r] == verifier.score(batch.responses[r], record.answer)
        # Shuffle the rows: scores, advantages and per-prompt outcomes follow their rows.
        perm = torch.randperm(batch.num_rows, generator=torch.Generator().manual_seed(0))
        shuffled = batch.permute(perm)
        rescored = verifier.score_batch(shuffled.responses, shuffled.answers)
        assert torch.equal(rescored, batch.rewards[perm])
        adv = grpo_advantages(batch.rewards, batch.group_index, batch.num_prompts)
        adv_s = grpo_advantages(rescored, shuffled.group_index, shuffled.num_prompts)
        torch.testing.assert_close(adv_s, adv[perm])
        # The store credited each prompt with exactly its own rollouts (16 seeded + n_i).
        g, _ = c.store.counters(batch.step_prompt_ids)
        expected = 16 + torch.zeros(batch.num_prompts).index_add_(0, batch.group_index, torch.ones(batch.num_rows))
        assert torch.equal(g.float(), expected)


@pytest.mark.slow
def test_token_budget_micro_batches_give_the_same_run(tmp_path):
    """trainer.max_tokens_per_microbatch (SFT, behaviour / reference log-probs and the updates
    packed by length) changes speed, not numbers: the SFT losses (4 updates), then the RL
    steps' rewards, log-prob / entropy statistics and losses, within float tolerance."""
    case = CASES["all_together"]
    runs = {}
    for name, extra in {"fixed": [], "budget": ["trainer.max_tokens_per_microbatch=40"]}.items():
        out = tmp_path / name
        with Trainer(compose(overrides=TINY + case + extra + [f"run.output_dir={out}"])) as trainer:
            trainer.run()
        runs[name] = read_metrics(out / "metrics.jsonl")
    fixed, budget = runs["fixed"], runs["budget"]
    assert len(fixed) == len(budget) == 3  # SFT, then 2 RL steps
    assert fixed[0]["sft/loss"] > 1.0
    for a, b in zip(fixed, budget):
        for key, value in a.items():
            if key.startswith("time/") or not isinstance(value, float) or math.isnan(value):
                continue
            assert b[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key


OFF = ["eval.at_start=false", "eval.at_end=false", "checkpoint.at_start=false", "checkpoint.at_end=false"]


def _checkpoints(run):
    return sorted(p.name for p in (run / "checkpoints").glob("step_*")) if (run / "checkpoints").exists() else []


def _eval_rows(run):
    path = run / "eval.jsonl"
    return read_metrics(path) if path.exists() else []


@pytest.mark.parametrize(
    "switches, evals, checkpoints",
    [
        (OFF, [], []),  # never evaluates, never checkpoints
        (["eval.at_start=false", "checkpoint.at_start=false"], [2], ["step_00000002"]),
        (["eval.at_end=false", "checkpoint.at_end=false"], [0], ["step_00000000"]),
        ([], [0, 2], ["step_00000000", "step_00000002"]),  # the defaults: start and end
    ],
    ids=["all_off", "end_only", "start_only", "defaults"],
)
def test_start_and_end_evaluations_and_checkpoints_can_be_turned_off(tmp_path, switches, evals, checkpoints):
    overrides = [*TINY, "sft.steps=0", *switches, f"run.output_dir={tmp_path}"]
    with Trainer(compose(overrides=overrides)) as trainer:
        result = trainer.run()
    assert result.steps_done == 2
    assert sorted({row["step"] for row in _eval_rows(tmp_path)}) == evals
    assert _checkpoints(tmp_path) == checkpoints
    assert (result.final_eval == {}) == (evals == [])


def test_a_signal_still_writes_a_checkpoint_with_checkpoints_off(tmp_path):
    """SIGTERM after step 1 of a run that writes no checkpoints: step 1 is saved, and run.resume=auto continues."""
    import os
    import signal

    from nemo_gdro.trainer.errors import RunInterrupted

    overrides = [*TINY, "sft.steps=0", *OFF, f"run.output_dir={tmp_path}"]
    with Trainer(compose(overrides=overrides)) as trainer:
        step = trainer.rl_step

        def step_then_sigterm(n):
            metrics = step(n)
            os.kill(os.getpid(), signal.SIGTERM)  # the handler only records it; the loop acts after the step
            return metrics

        trainer.rl_step = step_then_sigterm
        with pytest.raises(RunInterrupted, match="stopped by SIGTERM after step 1"):
            trainer.run()
    assert _checkpoints(tmp_path) == ["step_00000001"]
    with Trainer(compose(overrides=overrides)) as trainer:
        result = trainer.run()
    assert trainer.resumed and result.steps_done == 2
    assert _checkpoints(tmp_path) == ["step_00000001"] and _eval_rows(tmp_path) == []
