"""``algorithm.group_filter``: which groups a step trains on, and when it generates another round."""

import dataclasses

import pytest
import torch
from omegaconf import OmegaConf

from nemo_gdro.algorithms.configs import DynamicSamplingConfig
from nemo_gdro.algorithms.difficulty import DifficultyClassifier
from nemo_gdro.algorithms.stats import PromptStatsStore
from nemo_gdro.registries import GROUP_FILTERS, STAGE_REGISTRIES
from nemo_gdro.stages import AlgorithmSetup, StageContext, build_stages
from nemo_gdro.stages.group_filter import DynamicSampling, NoFilter, ZeroVarianceFilter, informative_groups
from nemo_gdro.stages.setup import STAGE_KEYS
from nemo_gdro.trainer.config import compose
from nemo_gdro.typed_config import ConfigError


def algorithm(**choices):
    section = OmegaConf.to_container(compose().algorithm, resolve=True)
    section.update(choices)
    return section


def build(**choices):
    setup = AlgorithmSetup.from_dict(algorithm(**choices), n_bar=4)
    store = PromptStatsStore(40, setup.stats)
    return build_stages(StageContext(setup, store, DifficultyClassifier(setup.difficulty, store), 40, seed=3)), setup


def test_informative_groups_are_those_whose_rewards_are_not_all_equal():
    # groups: 0 mixed, 1 all 1, 2 a single rollout, 3 all equal shaped (-0.5), 4 mixed by the overlong
    # penalty only, 5 no rows at all (a position without rollouts)
    rewards = torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0, -0.5, -0.5, -0.5, 1.0, 0.75], dtype=torch.float32)
    group_index = torch.tensor([0, 0, 1, 1, 2, 3, 3, 3, 4, 4])
    assert informative_groups(rewards, group_index, 6).tolist() == [True, False, False, False, True, False]
    # 0.1 + 0.2 style float noise cannot make an all-equal group informative: the test is exact (max == min)
    same = torch.full((3,), 0.1, dtype=torch.float32)
    assert informative_groups(same, torch.zeros(3, dtype=torch.int64), 1).tolist() == [False]


def test_none_keeps_everything_in_one_round():
    f = NoFilter()
    inf = torch.tensor([True, False, False, True])
    assert f.select(inf, 0, 4).tolist() == [True] * 4
    assert not f.another_round(0, 4, 1)


def test_filter_keeps_exactly_the_informative_groups_in_one_round():
    f = ZeroVarianceFilter()
    inf = torch.tensor([True, False, False, True])
    keep = f.select(inf, 0, 4)
    assert keep.tolist() == inf.tolist() and keep is not inf
    assert not f.another_round(2, 4, 1)  # no refill: the step trains on 2 of 4 prompts


def test_dynamic_sampling_fills_in_position_order_and_stops_at_the_target_or_the_cap():
    f = DynamicSampling(max_rounds=3)
    target = 4
    first = f.select(torch.tensor([True, False, True, False]), 0, target)
    assert first.tolist() == [True, False, True, False]
    assert f.another_round(2, target, 1)
    # Round 2 has three informative groups, two are still wanted: the first two by position.
    second = f.select(torch.tensor([False, True, True, True]), 2, target)
    assert second.tolist() == [False, True, True, False]
    assert not f.another_round(4, target, 2)  # filled
    # Not filled after the cap: the step trains on fewer groups.
    assert f.another_round(1, target, 2) and not f.another_round(1, target, 3)
    assert f.select(torch.tensor([True, True]), 4, target).tolist() == [False, False]


def test_dynamic_sampling_with_one_round_is_filter_only():
    f = DynamicSampling(max_rounds=1)
    assert f.select(torch.tensor([True, False, True]), 0, 3).tolist() == [True, False, True]
    assert not f.another_round(2, 3, 1)


@pytest.mark.parametrize(
    "name, cls", [("none", NoFilter), ("filter", ZeroVarianceFilter), ("dynamic_sampling", DynamicSampling)]
)
def test_each_name_builds_its_filter_and_keeps_no_state(name, cls):
    stages, setup = build(group_filter=name)
    assert isinstance(stages.group_filter, cls) and setup.group_filter == name
    assert stages.group_filter.stateful() == {}
    assert set(stages.stateful()) == {"sampler"}  # the default stack's state, nothing added
    assert stages.describe()["group_filter"] == cls.__name__


def test_default_is_none_and_yaml_matches_the_dataclass_default():
    setup = AlgorithmSetup.from_dict(algorithm(), n_bar=4)
    assert setup.group_filter == "none"
    assert setup.dynamic_sampling == DynamicSamplingConfig()
    assert compose().algorithm.dynamic_sampling.max_generation_batches == DynamicSamplingConfig().max_generation_batches == 4
    assert "group_filter" in STAGE_KEYS and STAGE_REGISTRIES["group_filter"] is GROUP_FILTERS
    assert GROUP_FILTERS.names() == ["none", "filter", "dynamic_sampling"]


def test_max_generation_batches_is_read_and_checked():
    stages, setup = build(group_filter="dynamic_sampling", dynamic_sampling={"max_generation_batches": 7})
    assert setup.dynamic_sampling.max_generation_batches == 7 and stages.group_filter.max_rounds == 7
    for bad, message in ((0, "must be an integer >= 1"), (-2, "must be an integer >= 1"), (1.5, "integer"), ("x", "")):
        with pytest.raises(ConfigError, match="algorithm.dynamic_sampling.max_generation_batches") as err:
            AlgorithmSetup.from_dict(algorithm(dynamic_sampling={"max_generation_batches": bad}), n_bar=4)
        assert message in str(err.value)
    # Checked whether or not the filter is selected (a typo never waits for the run that turns it on).
    with pytest.raises(ConfigError, match="algorithm.dynamic_sampling.max_gen_batches"):
        AlgorithmSetup.from_dict(algorithm(dynamic_sampling={"max_gen_batches": 2}), n_bar=4)


def test_unknown_filter_and_replay_with_a_filter_are_refused_by_key():
    with pytest.raises(ConfigError, match="algorithm.group_filter='dapo'.*none, filter, dynamic_sampling"):
        AlgorithmSetup.from_dict(algorithm(group_filter="dapo"), n_bar=4)
    section = algorithm(group_filter="filter")
    section["replay"]["ratio"] = 1.0
    with pytest.raises(ConfigError, match="algorithm.group_filter=filter cannot be combined with algorithm.replay.ratio"):
        AlgorithmSetup.from_dict(section, n_bar=4)
    missing = algorithm()
    del missing["group_filter"]
    with pytest.raises(ConfigError, match="missing key algorithm.group_filter"):
        AlgorithmSetup.from_dict(missing, n_bar=4)


def test_dynamic_sampling_config_rejects_bools():
    with pytest.raises(ValueError, match="dynamic_sampling.max_generation_batches"):
        DynamicSamplingConfig(max_generation_batches=True)
    assert dataclasses.replace(DynamicSamplingConfig(), max_generation_batches=1).max_generation_batches == 1
