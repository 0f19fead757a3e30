import pytest

from nemo_gdro.trainer.config import ConfigError, compose, validate


def test_default_config_is_the_tiny_cpu_run():
    cfg = validate(compose())
    assert cfg.model.preset == "tiny" and cfg.rollout.engine == "hf" and cfg.data.task == "arithmetic"
    assert cfg.algorithm.describe() == (
        "prompt_scheduler=uniform rollout_scheduler=fixed advantage_weighting=none token_modulation=none loss=clipped"
    )


def test_megatron_section_defaults_and_overrides():
    from nemo_gdro.models.megatron_options import MegatronOptions

    assert validate(compose()).megatron == MegatronOptions()
    cfg = validate(compose(overrides=["megatron.distributed_optimizer=true", "megatron.recompute_granularity=selective",
                                      "megatron.recompute_modules=[core_attn,mlp]"]))
    assert cfg.megatron.distributed_optimizer and cfg.megatron.recompute_modules == ("core_attn", "mlp")


def test_bf16_parameters_are_allowed_without_cuda():
    """The CPU shim (parallel/megatron_compat.py, patch 5) runs Megatron's bf16 optimizer on CPU."""
    import torch

    assert validate(compose(overrides=["model.dtype=bfloat16"])).model.torch_dtype == torch.bfloat16
    auto = validate(compose(overrides=["model.dtype=auto"])).model
    assert auto.resolved_dtype == ("bfloat16" if torch.cuda.is_available() else "float32")


def test_nemo_style_overrides():
    cfg = compose(overrides=["trainer.max_steps=7", "+model.overrides.num_query_groups=4", "model.overrides.num_layers=2", "++run.name=abc"])
    assert cfg.trainer.max_steps == 7 and cfg.model.overrides.num_query_groups == 4 and cfg.model.overrides.num_layers == 2
    assert cfg.run.output_dir == "outputs/abc"
    setup = validate(compose(overrides=["algorithm.rollout_scheduler=rollout_gdro", "algorithm.loss=r2vpo"])).algorithm
    assert setup.rollout_scheduler == "rollout_gdro" and setup.loss == "r2vpo"
    resample = validate(compose(overrides=["algorithm.prompt_scheduler=prompt_gdro_resample"])).algorithm
    assert resample.prompt_scheduler == "prompt_gdro_resample" and resample.advantage_weighting == "none"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["trainer.max_stepz=3"], "trainer.max_stepz"),
        (["++algorithm.r2vpo.deltaa=1"], "algorithm.r2vpo.deltaa"),
        (["algorithm.rollout_scheduler=rollout_gdro", "algorithm.rollout_gdro.n_min=20"], "rollout_gdro.n_max"),
        (["algorithm.rollout_scheduler=dynamo", "algorithm.dynamo.allocation.n_min=10"], "dynamo.n_bar"),
        (["rollout.engine=vllm"], "rollout.engine"),
        (["trainer.prompts_per_step=0"], "trainer.prompts_per_step"),
        (["algorithm.replay.ratio=-1.0"], "algorithm.replay: replay.ratio"),
        (["algorithm.replay.staleness=1.5"], "algorithm.replay.staleness must be an integer"),
        (["trainer.epochs_per_batch=0"], "trainer.epochs_per_batch"),
        (["algorithm.policy_loss.loss_agg_mode=sum"], "policy_loss.loss_agg_mode must be one of"),
        (["algorithm.difficulty.edges=[0.5,0.2]"], "difficulty.edges"),
        (["megatron.fp8=e4m3"], "megatron.fp8=e4m3 needs megatron.transformer_impl=transformer_engine"),
        (["megatron.fp8=e4m3", "megatron.transformer_impl=transformer_engine"], "needs model.dtype=bfloat16"),
        (["megatron.transformer_impl=transformer_engine"], "needs NVIDIA Transformer Engine"),
        (["megatron.recompute_granularity=full", "megatron.recompute_method=block"], "megatron.recompute_num_layers"),
        (["++megatron.fp8_recipie=blockwise"], "megatron.fp8_recipie"),
        (["model.dtype=float16"], "model.dtype"),
    ],
)
def test_bad_configs_fail_at_start_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        validate(compose(overrides=overrides))


@pytest.mark.parametrize(
    "override, replacement",
    [
        ("algorithm.prompt_gdro.enabled=true", "algorithm.advantage_weighting=prompt_gdro"),
        ("algorithm.prompt_gdro.apply=resample", "algorithm.prompt_scheduler=prompt_gdro_resample"),
        ("algorithm.rollout_gdro.enabled=true", "algorithm.rollout_scheduler=rollout_gdro"),
        ("algorithm.dynamo.allocation.enabled=true", "algorithm.rollout_scheduler=dynamo"),
        ("algorithm.dynamo.modulation.enabled=true", "algorithm.token_modulation=dynamo"),
        ("algorithm.r2vpo.enabled=true", "algorithm.loss=r2vpo"),
        ("+algorithm.r2vpo.enabled=true", "algorithm.loss=r2vpo"),
        ("algorithm.r2vpo.replay_ratio=1.0", "algorithm.replay.ratio"),
        ("algorithm.r2vpo.staleness=2", "algorithm.replay.staleness"),
        ("++algorithm.r2vpo.replay_ratio=1.0", "algorithm.replay.ratio"),
    ],
)
def test_retired_enabled_keys_say_which_key_to_use(override, replacement):
    with pytest.raises(ConfigError, match=replacement.replace(".", r"\.")):
        validate(compose(overrides=[override]))


def test_reward_section_defaults_keep_the_arithmetic_run():
    cfg = validate(compose(overrides=[]))
    assert cfg.reward.verifier == "arithmetic" and cfg.reward.verifier_config.verifier == "arithmetic"
    assert (cfg.reward.correct_reward, cfg.reward.wrong_reward) == (1.0, 0.0)
    assert not cfg.reward.overlong_config.enabled and not cfg.reward.mask_truncated
    dapo = validate(compose(overrides=["rollout.max_new_tokens=64", "reward.overlong.enabled=true",
                                       "reward.overlong.buffer_tokens=16", "reward.wrong_reward=-1.0"]))
    assert dapo.reward.overlong_config.buffer_tokens == 16 and dapo.reward.verifier_config.wrong_reward == -1.0


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["+reward.timeout=3"], "unknown key.*reward.timeout"),
        (["reward.timeout_s=0"], "reward.timeout_s must be a number > 0"),
        (["reward.num_workers=-1"], "reward.num_workers"),
        (["reward.wrong_reward=2.0"], "reward.correct_reward must be > reward.wrong_reward"),
        (["reward.verifier=nope"], "reward.verifier: unknown verifier 'nope'"),
        (["reward.choice_verifier=nope"], "reward.choice_verifier: unknown verifier 'nope'"),
        (["+reward.options.extract=dapo"], "reward.options: unknown key"),
        (["reward.verifier=dapo_math"], "reward.verifier=dapo_math does not score data.task=arithmetic"),
        (["+reward.overlong.len=4"], "unknown key.*reward.overlong.len"),
        (["reward.overlong.enabled=true"], r"reward.overlong.buffer_tokens must be an integer in \[1, 8\]"),
        (["reward.overlong.penalty=-1"], "reward.overlong.penalty"),
        (["reward.mask_truncated=1"], "reward.mask_truncated must be true or false"),
    ],
)
def test_bad_reward_configs_fail_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose(overrides=overrides))


def test_loss_replay_and_pass_defaults_are_written_once():
    """conf/train.yaml's policy_loss / r2vpo / replay sections and trainer.epochs_per_batch equal the dataclass defaults."""
    import dataclasses

    from nemo_gdro.algorithms.configs import PolicyLossConfig, R2VPOConfig, ReplayConfig
    from nemo_gdro.trainer.run_config import TrainerSection

    cfg = validate(compose())
    assert cfg.algorithm.policy_loss == PolicyLossConfig()
    assert cfg.algorithm.r2vpo == R2VPOConfig()
    assert cfg.algorithm.replay == ReplayConfig() and not cfg.algorithm.replays
    default = {f.name: f.default for f in dataclasses.fields(TrainerSection)}["epochs_per_batch"]
    assert cfg.trainer.epochs_per_batch == default == 1


@pytest.mark.parametrize("loss", ["clipped", "r2vpo"])
def test_replay_and_the_new_options_work_with_every_loss(loss):
    cfg = validate(compose(overrides=[
        f"algorithm.loss={loss}", "algorithm.replay.ratio=0.5", "algorithm.replay.staleness=2",
        "trainer.epochs_per_batch=3", "algorithm.policy_loss.loss_agg_mode=informative-token-mean",
    ]))
    assert cfg.algorithm.replays and (cfg.algorithm.replay.ratio, cfg.algorithm.replay.staleness) == (0.5, 2)
    assert cfg.trainer.epochs_per_batch == 3
    assert cfg.algorithm.policy_loss.loss_agg_mode == "informative-token-mean"
