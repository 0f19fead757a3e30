import pytest
from omegaconf import OmegaConf

from nemo_gdro.rewards.arithmetic import ArithmeticVerifier
from nemo_gdro.rewards.choice import ChoiceVerifier
from nemo_gdro.rewards.registry import VERIFIERS, RewardConfig, build_reward, build_verifier, verifier_class


def test_every_registered_name_builds():
    assert set(VERIFIERS) == {"arithmetic", "math_verify", "dapo_math", "gpqa_choice"}
    for name in VERIFIERS:
        v = build_verifier(name, None, 1.0, -1.0)
        assert isinstance(v, verifier_class(name)) and v.reward_range == (-1.0, 1.0)
    assert isinstance(build_verifier("arithmetic"), ArithmeticVerifier)
    g = build_verifier("gpqa_choice", {"letters": "ABCDE", "tail_chars": 100})
    assert isinstance(g, ChoiceVerifier) and g.options.letters == "ABCDE"


def test_defaults():
    cfg = RewardConfig()
    assert (cfg.verifier, cfg.correct_reward, cfg.wrong_reward) == ("dapo_math", 1.0, 0.0)
    assert (cfg.num_workers, cfg.timeout_s, cfg.soft_timeout_fraction) == (2, 5.0, 0.8)
    assert (cfg.max_tasks_per_worker, cfg.max_memory_mb) == (0, 4096)


@pytest.mark.parametrize(
    "cfg,match",
    [
        ({"verifier": "nope"}, r"reward.verifier: unknown verifier 'nope'"),
        ({"verifier": "dapo_math", "options": {"extrct": "dapo"}}, r"reward.options: unknown key\(s\) \['extrct'\]"),
        ({"verifier": "dapo_math", "options": {"extract": "x"}}, r"reward.options.extract must be one of"),
        ({"verifier": "math_verify", "options": {"extract": "dapo"}}, r"reward.options: .*allowed: none"),
        ({"timeout": 3}, r"reward: unknown key\(s\) \['timeout'\]"),
        ({"timeout_s": 0}, r"reward.timeout_s must be a number > 0"),
        ({"timeout_s": "5"}, r"reward.timeout_s"),
        ({"num_workers": -1}, r"reward.num_workers"),
        ({"num_workers": 1.5}, r"reward.num_workers"),
        ({"soft_timeout_fraction": 1.0}, r"reward.soft_timeout_fraction"),
        ({"max_tasks_per_worker": -2}, r"reward.max_tasks_per_worker"),
        ({"max_memory_mb": 10}, r"reward.max_memory_mb"),
        ({"start_timeout_s": 0}, r"reward.start_timeout_s"),
        ({"correct_reward": 0.0, "wrong_reward": 0.0}, r"reward.correct_reward must be > reward.wrong_reward"),
        ({"correct_reward": True}, r"reward.correct_reward"),
        ({"options": [1]}, r"reward.options must be a mapping"),
    ],
)
def test_bad_config_names_the_key(cfg, match):
    with pytest.raises(ValueError, match=match):
        RewardConfig.from_mapping(cfg)


def test_from_omegaconf_section_inline():
    section = OmegaConf.create(
        {"verifier": "dapo_math", "correct_reward": 1.0, "wrong_reward": -1.0, "num_workers": 0,
         "options": {"extract": "boxed"}}
    )  # fmt: skip
    cfg = RewardConfig.from_mapping(OmegaConf.to_container(section))
    with build_reward(cfg) as v:
        assert v.verifier.extract == "boxed"
        assert v.score_batch(["\\boxed{3}", "Answer: 3"], ["3", "3"]).tolist() == [1.0, -1.0]
    assert RewardConfig.from_mapping({"options": None}).options == {}
