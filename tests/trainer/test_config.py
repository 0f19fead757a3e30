import pytest

from nemo_gdro.trainer.config import ConfigError, compose, validate


def test_default_config_is_the_tiny_cpu_run():
    cfg = compose()
    setup = validate(cfg)
    assert cfg.model.preset == "tiny" and cfg.rollout.engine == "hf"
    assert setup.describe() == "sampler=uniform allocator=fixed advantage_weighting=none token_modulation=none loss=clipped"


def test_nemo_style_overrides():
    cfg = compose(overrides=["trainer.max_steps=7", "+model.overrides.num_query_groups=4", "model.overrides.num_layers=2", "++run.name=abc"])
    assert cfg.trainer.max_steps == 7 and cfg.model.overrides.num_query_groups == 4 and cfg.model.overrides.num_layers == 2
    assert cfg.run.output_dir == "outputs/abc"
    setup = validate(compose(overrides=["algorithm.rollout_gdro.enabled=true", "algorithm.r2vpo.enabled=true"]))
    assert setup.allocator == "rollout_gdro" and setup.loss == "r2vpo"
    resample = validate(compose(overrides=["algorithm.prompt_gdro.enabled=true", "algorithm.prompt_gdro.apply=resample"]))
    assert resample.sampler == "prompt_gdro" and resample.advantage_weighting == "none"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["trainer.max_stepz=3"], "trainer.max_stepz"),
        (["++algorithm.r2vpo.deltaa=1"], "algorithm.r2vpo.deltaa"),
        (["algorithm.rollout_gdro.n_min=20"], "rollout_gdro.n_max"),
        (["algorithm.dynamo.allocation.n_min=10"], "dynamo.n_bar"),
        (["algorithm.rollout_gdro.enabled=true", "algorithm.dynamo.allocation.enabled=true"], "one of them"),
        (["rollout.engine=vllm"], "vllm"),
        (["trainer.prompts_per_step=0"], "trainer.prompts_per_step"),
        (["algorithm.r2vpo.replay_ratio=1.0"], "algorithm.r2vpo.enabled"),
        (["algorithm.difficulty.edges=[0.5,0.2]"], "difficulty.edges"),
    ],
)
def test_bad_configs_fail_at_start_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        validate(compose(overrides=overrides))
