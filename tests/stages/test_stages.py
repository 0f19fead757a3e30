"""The stage protocols, each implemented by the existing controllers, built by name."""

import pytest
import torch
from omegaconf import OmegaConf

from nemo_gdro.algorithms.difficulty import DifficultyClassifier
from nemo_gdro.algorithms.rollout_gdro import RolloutPlan
from nemo_gdro.algorithms.stats import PromptStatsStore, group_outcomes
from nemo_gdro.stages import AlgorithmSetup, MinibatchView, StageContext, StepFeedback, build_stages
from nemo_gdro.stages.advantage import NoWeighting, PromptGDROFeedback, PromptGDROWeighting
from nemo_gdro.stages.loss import ClippedLoss, R2VPOLoss
from nemo_gdro.stages.modulation import DynamoModulation, NoModulation
from nemo_gdro.stages.prompt import PromptGDROResample, UniformPrompts
from nemo_gdro.stages.rollout import DynamoScheduler, FixedRollouts, RolloutGDROScheduler
from nemo_gdro.trainer.config import compose
from nemo_gdro.typed_config import ConfigError

N, P, N_BAR = 40, 8, 4


def algorithm(**choices):
    section = OmegaConf.to_container(compose().algorithm, resolve=True)
    section.update(choices)
    section["dynamo"]["allocation"].update(n_min=2, n_max=8)
    return section


def build(**choices):
    setup = AlgorithmSetup.from_dict(algorithm(**choices), n_bar=N_BAR)
    store = PromptStatsStore(N, setup.stats)
    classifier = DifficultyClassifier(setup.difficulty, store)
    ctx = StageContext(setup, store, classifier, N, seed=3)
    return build_stages(ctx), store, classifier, ctx


def run_step(stages, store, classifier, g, pass_rate):
    draw = stages.prompts.draw(P)
    bins = classifier.classify(draw.ids)
    alloc = stages.rollouts.allocate(draw, bins)
    gi = torch.repeat_interleave(torch.arange(P), alloc.counts)
    rewards = (torch.rand(gi.numel(), generator=g) < pass_rate[draw.ids][gi]).float()
    weights, w_bin = stages.weighting.weights(bins[gi])
    store.observe(draw.ids, *group_outcomes(rewards, gi, P))
    signal = (1.0 - rewards).double()
    feedback = StepFeedback(draw, bins, alloc, bins[gi], gi, rewards, signal, w_bin)
    for obs in stages.observers:
        obs.observe(feedback)
    diagnostics = {}
    for obs in stages.observers:
        diagnostics.update(obs.diagnostics(feedback))
    return draw, alloc, weights, diagnostics


def test_default_stack_is_grpo():
    stages, *_ = build()
    assert isinstance(stages.prompts, UniformPrompts) and isinstance(stages.rollouts, FixedRollouts)
    assert isinstance(stages.weighting, NoWeighting) and isinstance(stages.modulation, NoModulation)
    assert isinstance(stages.loss, ClippedLoss) and not stages.needs_current_policy
    assert set(stages.stateful()) == {"sampler"}


@pytest.mark.parametrize(
    "choices, types, state",
    [
        ({"prompt_scheduler": "prompt_gdro_resample"}, (PromptGDROResample,), {"bin_index", "prompt_gdro"}),
        ({"rollout_scheduler": "rollout_gdro"}, (RolloutGDROScheduler,), {"sampler", "rollout_gdro"}),
        ({"rollout_scheduler": "dynamo"}, (DynamoScheduler,), {"sampler", "dynamo"}),
        ({"advantage_weighting": "prompt_gdro"}, (PromptGDROWeighting,), {"sampler", "prompt_gdro"}),
        ({"token_modulation": "dynamo"}, (DynamoModulation,), {"sampler"}),
        ({"loss": "r2vpo"}, (R2VPOLoss,), {"sampler", "dual"}),
    ],
)
def test_each_name_builds_its_stage(choices, types, state):
    stages, *_ = build(**choices)
    parts = (stages.prompts, stages.rollouts, stages.weighting, stages.modulation, stages.loss)
    assert any(isinstance(p, types) for p in parts)
    assert set(stages.stateful()) == state


def test_rollout_schedulers_are_compute_neutral_and_live():
    g = torch.Generator().manual_seed(0)
    pass_rate = torch.rand(N, generator=g)
    for name in ("fixed", "rollout_gdro", "dynamo"):
        stages, store, classifier, _ = build(rollout_scheduler=name)
        for _ in range(12):
            draw, alloc, _, diagnostics = run_step(stages, store, classifier, g, pass_rate)
            assert int(alloc.counts.sum()) == P * N_BAR and int(alloc.counts.min()) >= 1
        if name == "rollout_gdro":
            assert isinstance(alloc.plan, RolloutPlan) and stages.rollouts.controller.num_updates == 12
            assert "rollout_gdro/mu" in diagnostics
        if name == "dynamo":
            assert "dynamo/n/max" in diagnostics and int(alloc.counts.max()) > N_BAR  # variance-driven, not uniform


def test_shared_prompt_gdro_is_observed_once_per_step():
    """gdro.md §6.3: resampling and advantage weights share one controller, updated once per step."""
    stages, store, classifier, ctx = build(prompt_scheduler="prompt_gdro_resample", advantage_weighting="prompt_gdro")
    assert stages.prompts.prompt_gdro is stages.weighting.controller is ctx.shared_prompt_gdro
    assert sum(isinstance(o, PromptGDROFeedback) for o in stages.observers) == 1
    g = torch.Generator().manual_seed(1)
    pass_rate = torch.rand(N, generator=g)
    for step in range(1, 6):
        _, _, weights, diagnostics = run_step(stages, store, classifier, g, pass_rate)
        assert ctx.shared_prompt_gdro.num_updates == step
    assert weights is not None and "prompt_gdro/q/0" in diagnostics
    # The resampler re-bins the prompts it has seen: the bin index is no longer all-unseen.
    assert int((stages.prompts.index.counts() > 0).sum()) > 1


def test_dynamo_scheduler_refreshes_its_snapshot_when_an_epoch_starts():
    section = algorithm(rollout_scheduler="dynamo")
    section["dynamo"]["allocation"]["refresh"] = "every_epoch"
    setup = AlgorithmSetup.from_dict(section, n_bar=N_BAR)
    store = PromptStatsStore(N, setup.stats)
    classifier = DifficultyClassifier(setup.difficulty, store)
    stages = build_stages(StageContext(setup, store, classifier, N, seed=0))
    g = torch.Generator().manual_seed(0)
    pass_rate = torch.rand(N, generator=g)
    snapshots = []
    for _ in range(2 * N // P + 1):
        run_step(stages, store, classifier, g, pass_rate)
        snapshots.append(float(stages.rollouts.allocator._snap_g.sum()))
    assert snapshots[0] == 0.0 and snapshots[-1] > 0.0  # the snapshot moved only at epoch starts
    assert len(set(snapshots)) <= 3


def test_loss_stages_prepare_their_contexts():
    logp = torch.log(torch.full((2, 3), 0.5))
    view = MinibatchView(
        advantages=torch.tensor([1.0, -1.0]), behaviour_logp=logp - 0.1, mask=torch.ones(2, 3, dtype=torch.bool),
        current={"logp": logp, "entropy": torch.ones(2, 3), "ebar": torch.zeros(2, 3)},
    )
    section = algorithm(loss="r2vpo")
    section["r2vpo"]["center"] = "batch_mean"
    setup = AlgorithmSetup.from_dict(section, n_bar=N_BAR)
    r2 = R2VPOLoss(setup.r2vpo, ctx_dp())
    assert r2.needs_current_policy
    context = r2.prepare(view)
    assert context["lam"] == r2.dual.lam and context["ratio_mean"] == pytest.approx(float(torch.exp(torch.tensor(0.1))))
    before = r2.dual.lam
    metrics = r2.after_update({"r2vpo/sum_sq_dev": 10.0, "tokens": 10.0})  # V = 1 > delta: lambda rises
    assert metrics["r2vpo/V"] == 1.0 and r2.dual.lam > before
    mod = DynamoModulation(setup.dynamo_modulation, ctx_dp())
    assert mod.needs_current_policy and not mod.prepare(view).empty


@pytest.mark.parametrize(
    "choices, ebar_mode, needs",
    [({}, "exact", False), ({"loss": "r2vpo"}, "exact", False), ({"token_modulation": "dynamo"}, "exact", True),
     ({"token_modulation": "dynamo"}, "sequence_mean", False)],
)
def test_ebar_is_needed_only_by_exact_dynamo_modulation(choices, ebar_mode, needs):
    section = algorithm(**choices)
    section["dynamo"]["modulation"]["ebar"] = ebar_mode
    setup = AlgorithmSetup.from_dict(section, n_bar=N_BAR)
    store = PromptStatsStore(N, setup.stats)
    stages = build_stages(StageContext(setup, store, DifficultyClassifier(setup.difficulty, store), N, seed=3))
    assert stages.needs_ebar is needs


def test_sequence_mean_modulation_runs_without_ebar():
    """ebar=sequence_mean: prepare and modulate work from statistics that have no ``ebar``."""
    section = algorithm(token_modulation="dynamo")
    section["dynamo"]["modulation"]["ebar"] = "sequence_mean"
    setup = AlgorithmSetup.from_dict(section, n_bar=N_BAR)
    mod = DynamoModulation(setup.dynamo_modulation, ctx_dp())
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(2, 3, generator=g)
    stats = {"logp": logp, "entropy": torch.rand(2, 3, generator=g) + 0.5}
    view = MinibatchView(advantages=torch.tensor([1.0, -1.0]), behaviour_logp=logp - 0.1,
                         mask=torch.ones(2, 3, dtype=torch.bool), current=stats)
    context = mod.prepare(view)
    adv, _ = mod.modulate(view.advantages[:, None].expand(2, 3), stats, view.behaviour_logp, view.mask, context)
    assert torch.isfinite(adv).all()


def ctx_dp():
    from nemo_gdro.parallel.rows import DataParallel

    return DataParallel()


def test_disabled_sections_are_type_checked_but_not_range_checked():
    # rollout.n = 16 is outside the (unselected) Rollout-GDRO bounds [2, 12]: valid.
    AlgorithmSetup.from_dict(algorithm(), n_bar=16)
    with pytest.raises(ConfigError, match="rollout_gdro"):
        AlgorithmSetup.from_dict(algorithm(rollout_scheduler="rollout_gdro"), n_bar=16)
    bad = algorithm()
    bad["rollout_gdro"]["n_min"] = "two"
    with pytest.raises(ConfigError, match="algorithm.rollout_gdro.n_min must be an integer"):
        AlgorithmSetup.from_dict(bad, n_bar=4)


def build_section(section, seed=3):
    setup = AlgorithmSetup.from_dict(section, n_bar=N_BAR)
    store = PromptStatsStore(N, setup.stats)
    classifier = DifficultyClassifier(setup.difficulty, store)
    return build_stages(StageContext(setup, store, classifier, N, seed=seed)), store, classifier


@pytest.mark.parametrize("base", ["data", "bins"])
def test_resample_stage_resume_repeats_the_next_draws(base, tmp_path):
    """PromptGDROResample: a state_dict round trip (controller, bin index, store) gives the same next draws
    and importance factors; `data` draws no prompt twice in a step."""
    section = algorithm(prompt_scheduler="prompt_gdro_resample")
    section["prompt_gdro"].update(resample_base=base, importance_correct=True, signal="failure")
    a, store_a, clf_a = build_section(section)
    g = torch.Generator().manual_seed(0)
    pass_rate = torch.rand(N, generator=g)
    for _ in range(4):
        draw, *_ = run_step(a, store_a, clf_a, g, pass_rate)
        if base == "data":
            assert draw.ids.unique().numel() == P
    assert int((a.prompts.index.counts() > 0).sum()) > 1  # the adversary has bins to choose among
    saved = {name: obj.state_dict() for name, obj in a.stateful().items()}
    torch.save({"stages": saved, "store": store_a.state_dict()}, tmp_path / "ckpt.pt")
    loaded = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    b, store_b, clf_b = build_section(section, seed=77)  # another seed: everything must come from the checkpoint
    for name, obj in b.stateful().items():
        obj.load_state_dict(loaded["stages"][name])
    store_b.load_state_dict(loaded["store"])
    g_state = g.get_state()
    g_b = torch.Generator()
    g_b.set_state(g_state)
    for _ in range(3):
        draw_a, _, _, diag_a = run_step(a, store_a, clf_a, g, pass_rate)
        draw_b, _, _, diag_b = run_step(b, store_b, clf_b, g_b, pass_rate)
        assert torch.equal(draw_a.ids, draw_b.ids) and torch.equal(draw_a.q, draw_b.q)
        bins = clf_a.classify(draw_a.ids)
        assert torch.equal(
            a.prompts.response_weights(draw_a, bins), b.prompts.response_weights(draw_b, clf_b.classify(draw_b.ids))
        )
        assert diag_a == diag_b and f"prompt_gdro/draw_p/{int(bins[0])}" in diag_a


def test_weighting_stages_take_the_informative_mask():
    section = algorithm(advantage_weighting="prompt_gdro")
    section["prompt_gdro"]["normalize_over"] = "informative"
    stages, *_ = build_section(section)
    stages.weighting.controller.scores = torch.tensor([1.0] + [0.0] * 9, dtype=torch.float64)
    response_bins = torch.tensor([0, 0, 5, 5])
    informative = torch.tensor([False, False, True, True])
    w, w_bin = stages.weighting.weights(response_bins, informative)
    assert w[informative].mean().item() == pytest.approx(1.0) and w[0] > 1.0
    assert torch.isnan(w_bin[[1, 2, 3, 4, 6, 7, 8, 9]]).all()
    none, *_ = build_section(algorithm())
    assert none.weighting.weights(response_bins, informative) == (None, None)
