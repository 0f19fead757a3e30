"""The baselines of the efficacy benchmark (issue 19): group `baselines`, each method's run config."""

import pytest

from benchmarks import efficacy as eff

#: Methods whose keys come with other parts of issue 19 (group filters, the clipped loss with replay,
#: multi-pass); they compose once that work is in.
ELSEWHERE = {
    "dapo_dynamic_sampling": ["algorithm.group_filter=dynamic_sampling"],
    "filter_only": ["algorithm.group_filter=filter"],
    "clipped_replay": ["algorithm.replay.ratio=1.0"],
    "grpo_2pass": ["trainer.epochs_per_batch=2"],
}
HERE = ["dr_grpo", "grpo_16x8", "grpo_8x16", "grpo_64x2", "skip"]


def test_baselines_group_lists_every_baseline_and_control():
    cfg = eff.load_config(eff.DEFAULT_CONFIG)
    assert cfg.groups["baselines"] == ["grpo", *HERE, *ELSEWHERE]
    for name, overrides in ELSEWHERE.items():
        assert cfg.methods[name] == overrides, name
    assert cfg.methods["skip"] == ["algorithm.prompt_scheduler=skip_zero_variance"]


@pytest.mark.slow
def test_each_baseline_composes_at_the_testbed_budget(tmp_path):
    from nemo_gdro.trainer.config import compose, validate

    cfg = eff.load_config(eff.DEFAULT_CONFIG)
    _, runs = eff.plan_jobs(cfg, ["grpo", *HERE], cfg.seeds[:1], "validation", tmp_path)
    trees = {r.method: validate(compose("train", r.overrides)) for r in runs}
    base = trees["grpo"]
    budget = base.trainer.prompts_per_step * base.rollout.n
    assert budget == 128
    for name, c in trees.items():
        t = c.trainer
        # Equal generated rollouts per step, 2 mini-batches that split into whole micro-batches.
        assert t.prompts_per_step * c.rollout.n == budget, name
        assert t.minibatches_per_step == 2 and (budget // t.minibatches_per_step) % t.micro_batch_size == 0, name
        assert c.trainer.max_steps == base.trainer.max_steps, name
    splits = {n: (trees[n].trainer.prompts_per_step, trees[n].rollout.n) for n in ("grpo_16x8", "grpo_8x16", "grpo_64x2")}
    assert splits == {"grpo_16x8": (16, 8), "grpo_8x16": (8, 16), "grpo_64x2": (64, 2)}
    dr = trees["dr_grpo"].algorithm
    assert not dr.advantage.normalize_by_std and dr.policy_loss.loss_agg_mode == "seq-mean-token-sum-norm"
    assert dr.policy_loss.norm_constant == trees["dr_grpo"].rollout.max_new_tokens  # Dr.GRPO's constant: the max length
    skip = trees["skip"].algorithm
    assert skip.prompt_scheduler == "skip_zero_variance" and skip.prompt_skip == base.algorithm.prompt_skip


def test_quick_takes_the_methods_named_on_the_command_line(tmp_path, capsys):
    # An unknown name is refused before anything runs: --methods is read in --quick mode too.
    assert eff.main(["--quick", "--methods", "grpo,no_such_method", "--work-dir", str(tmp_path / "w")]) == 2
    assert "no_such_method" in capsys.readouterr().err
    assert eff._method_list(" grpo, skip ,") == ["grpo", "skip"] and eff._method_list(None) == []
