"""Every component a config names resolves through a registry; unknown names list the valid ones."""

import pytest

from nemo_gdro.registries import (
    ADVANTAGE_WEIGHTINGS,
    MODEL_SOURCES,
    POLICY_LOSSES,
    PROMPT_SCHEDULERS,
    ROLLOUT_ENGINES,
    ROLLOUT_SCHEDULERS,
    TASKS,
    TOKENIZERS,
    TOKEN_MODULATIONS,
)
from nemo_gdro.registry import Registry, UnknownNameError
from nemo_gdro.trainer.config import ConfigError, compose, validate

ALL = [PROMPT_SCHEDULERS, ROLLOUT_SCHEDULERS, ADVANTAGE_WEIGHTINGS, TOKEN_MODULATIONS, POLICY_LOSSES,
       TASKS, TOKENIZERS, MODEL_SOURCES, ROLLOUT_ENGINES]


@pytest.mark.parametrize("registry", ALL, ids=lambda r: r.key)
def test_every_entry_imports(registry):
    for name in registry.names():
        assert registry.get(name) is not None


@pytest.mark.parametrize("registry", ALL, ids=lambda r: r.key)
def test_unknown_name_in_the_config_lists_the_valid_names(registry):
    override = f"{registry.key}=nope"
    with pytest.raises(ConfigError) as err:
        validate(compose(overrides=[override]))
    message = str(err.value)
    assert registry.key in message and "nope" in message
    for name in registry.names():
        assert name in message


def test_registry_rejects_malformed_entries_and_unknown_names():
    with pytest.raises(ValueError, match="module:attribute"):
        Registry("thing", "x.y", {"a": "no_colon"})
    reg = Registry("thing", "x.y", {"a": "math:sqrt"})
    assert reg.get("a")(4.0) == 2.0 and "a" in reg and reg.names() == ["a"]
    with pytest.raises(UnknownNameError, match=r"x\.y='b' is not a known thing; valid names: a"):
        reg.get("b")
    with pytest.raises(UnknownNameError):
        reg.check(3)


def test_prompt_schedulers_list_the_zero_variance_skip():
    assert "skip_zero_variance" in PROMPT_SCHEDULERS.names()
    assert PROMPT_SCHEDULERS.get("skip_zero_variance").__name__ == "ZeroVarianceSkipPrompts"
    cfg = validate(compose(overrides=["algorithm.prompt_scheduler=skip_zero_variance"]))
    assert cfg.algorithm.prompt_scheduler == "skip_zero_variance"
