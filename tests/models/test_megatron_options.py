"""The ``megatron`` section: invalid combinations, host/run checks, the mapping onto Megatron-Core configs.

TransformerConfig is constructed on CPU for the valid FP8 / recompute combinations (a
dense config makes no Transformer Engine calls), and the raw Megatron kwargs of the
combinations our checks reject are shown to be rejected by Megatron too.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from nemo_gdro.models.gpt import PRESETS
from nemo_gdro.models.megatron_options import HostInfo, MegatronOptions, check_environment, check_model
from nemo_gdro.typed_config import ConfigError, build_section

TE = {"transformer_impl": "transformer_engine"}
FP8 = {**TE, "fp8": "e4m3"}
H100 = HostInfo(te_installed=True, te_usable=True, sm=90, cuda_version=(12, 9))
CPU_NO_TE = HostInfo(te_installed=False)


def _build(values: dict) -> MegatronOptions:
    return build_section(MegatronOptions, "megatron", values)


def test_defaults_are_plain_megatron():
    opts = _build({})
    assert opts.transformer_impl == "local" and opts.fp8 is None and not opts.uses_te
    assert opts.transformer_config_kwargs() == {}
    assert opts.ddp_config_kwargs() == {
        "grad_reduce_in_fp32": True, "overlap_grad_reduce": False, "overlap_param_gather": False,
        "use_distributed_optimizer": False,
    }
    assert opts.optimizer_config_kwargs() == {"use_distributed_optimizer": False, "fp8_recipe": None}
    assert opts.sequence_multiple(tensor_parallel=8) == 1
    check_environment(opts, params_dtype="float32", tensor_parallel=1, host=CPU_NO_TE)


@pytest.mark.parametrize(
    "values, fragment",
    [
        ({"fp8": "e4m3"}, "megatron.fp8=e4m3 needs megatron.transformer_impl=transformer_engine"),
        ({"fp8_param": True}, "megatron.fp8_param=true needs megatron.fp8"),
        ({**FP8, "fp8_param": True}, "megatron.fp8_param=true needs megatron.distributed_optimizer=true"),
        ({"first_last_layers_bf16": True}, "megatron.first_last_layers_bf16=true needs megatron.fp8"),
        ({**FP8, "first_last_layers_bf16": True}, "does not work with megatron.fp8_recipe=delayed"),
        ({**FP8, "fp8_amax_history_len": 0}, "megatron.fp8_amax_history_len must be >= 1"),
        ({**FP8, "fp8_margin": -1}, "megatron.fp8_margin"),
        ({**FP8, "fp8_recipe": "blockwise", "first_last_layers_bf16": True, "num_layers_at_end_in_bf16": -1},
         "megatron.num_layers_at_end_in_bf16"),
        ({"recompute_granularity": "full"}, "needs megatron.recompute_method"),
        ({"recompute_granularity": "full", "recompute_method": "uniform"}, "needs megatron.recompute_num_layers >= 1"),
        ({"recompute_granularity": "full", "recompute_method": "block", "recompute_num_layers": 1,
          "recompute_modules": ["mlp"]}, "megatron.recompute_modules applies to recompute_granularity=selective"),
        ({"recompute_granularity": "selective", "recompute_num_layers": 2}, "megatron.recompute_num_layers applies"),
        ({"recompute_granularity": "selective", "recompute_modules": ["layernorm"]}, "megatron.recompute_modules must"),
        ({"recompute_granularity": "selective", "recompute_modules": []}, "megatron.recompute_modules must"),
        ({"recompute_method": "block"}, "megatron.recompute_method applies only with megatron.recompute_granularity"),
        ({"sequence_parallel": True}, "megatron.sequence_parallel=true needs megatron.transformer_impl"),
        ({"fp8": "e5m2"}, "megatron.fp8 must be"),
        ({**FP8, "fp8_recipe": "custom"}, "megatron.fp8_recipe must be"),
        ({"transformer_impl": "te"}, "megatron.transformer_impl must be"),
        ({"distributed_optimizer": 1}, "megatron.distributed_optimizer must be true or false"),
        ({"fp8_recipee": "delayed"}, "unknown key(s) megatron.fp8_recipee"),
    ],
)
def test_invalid_combinations_name_the_key(values, fragment):
    with pytest.raises(ConfigError) as info:
        _build(values)
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    "values, dtype, tp, host, fragment",
    [
        (FP8, "bfloat16", 1, CPU_NO_TE, "megatron.fp8=e4m3 needs NVIDIA Transformer Engine"),
        (TE, "bfloat16", 1, CPU_NO_TE, "megatron.transformer_impl=transformer_engine needs NVIDIA Transformer Engine"),
        (FP8, "bfloat16", 1, HostInfo(te_installed=True, te_usable=False, sm=90, cuda_version=(12, 9)),
         "Megatron-Core cannot use it"),
        (FP8, "float32", 1, H100, "needs model.dtype=bfloat16"),
        ({**TE, "sequence_parallel": True}, "bfloat16", 1, H100, "needs parallel.tensor_parallel > 1"),
        ({**FP8, "fp8_recipe": "blockwise"}, "bfloat16", 1, HostInfo(True, True, 90, (12, 8)),
         "megatron.fp8_recipe=blockwise: fp8_recipe=blockwise on Hopper needs CUDA >= 12.9"),
        ({**FP8, "fp8_recipe": "mxfp8"}, "bfloat16", 1, H100, "megatron.fp8_recipe=mxfp8: fp8_recipe=mxfp8 needs Blackwell"),
        (FP8, "bfloat16", 1, HostInfo(True, True, 80, (12, 8)), "compute capability >= 8.9"),
    ],
)
def test_environment_errors(values, dtype, tp, host, fragment):
    opts = _build(values)
    with pytest.raises(ConfigError) as info:
        check_environment(opts, params_dtype=dtype, tensor_parallel=tp, host=host)
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    "values, host",
    [
        ({**FP8, "fp8_recipe": "blockwise"}, H100),
        ({**FP8, "fp8_recipe": "mxfp8"}, HostInfo(True, True, 100, (12, 8))),
        ({**FP8, "fp8": "hybrid", "fp8_recipe": "tensorwise", "sequence_parallel": True}, H100),
        # On a CPU host with TE installed the hardware rule is skipped; the TE rule still applies.
        ({**FP8, "fp8_recipe": "mxfp8"}, HostInfo(te_installed=True)),
    ],
)
def test_valid_gpu_combinations_pass(values, host):
    check_environment(_build(values), params_dtype="bfloat16", tensor_parallel=2, host=host)


def test_model_checks():
    tiny, big = PRESETS["tiny"], PRESETS["qwen3_8b"]
    full = _build({"recompute_granularity": "full", "recompute_method": "block", "recompute_num_layers": 2})
    check_model(full, tiny, tensor_parallel=1, pipeline_parallel=1)
    with pytest.raises(ConfigError, match=r"megatron.recompute_num_layers=2 exceeds the 1 layers per pipeline stage"):
        check_model(full, tiny, tensor_parallel=1, pipeline_parallel=2)
    blockwise = _build({**FP8, "fp8_recipe": "blockwise"})
    check_model(blockwise, big, tensor_parallel=8, pipeline_parallel=1)
    with pytest.raises(ConfigError, match=r"megatron.fp8_recipe=blockwise: .*linear_qkv \[128, 64\]"):
        check_model(blockwise, tiny, tensor_parallel=1, pipeline_parallel=1)
    check_model(_build(FP8), tiny, tensor_parallel=1, pipeline_parallel=1)  # delayed: multiples of 16 suffice
    bf16_ends = _build({**FP8, "fp8_recipe": "tensorwise", "first_last_layers_bf16": True, "num_layers_at_start_in_bf16": 20})
    with pytest.raises(ConfigError, match="megatron.num_layers_at_start_in_bf16=20 exceeds the 18 layers"):
        check_model(bf16_ends, big, tensor_parallel=1, pipeline_parallel=2)


def test_sequence_multiple_follows_the_section():
    assert _build({**FP8, "fp8_recipe": "blockwise"}).sequence_multiple(4) == 128
    assert _build({**FP8, "fp8_recipe": "blockwise", "sequence_parallel": True}).sequence_multiple(4) == 512
    assert _build({**TE, "sequence_parallel": True}).sequence_multiple(4) == 4


# ---------------------------------------------------------------------------- TransformerConfig on CPU
pytest.importorskip("megatron.core")

#: Dense, FP8-aligned, tiny: TransformerConfig validation only.
SPEC = dataclasses.replace(PRESETS["tiny"], hidden_size=128, ffn_hidden_size=256, num_layers=4, head_dim=32)


@pytest.fixture(scope="module")
def dist_env():
    from nemo_gdro.parallel.distributed import destroy_distributed, init_distributed

    info = init_distributed(seed=0)
    yield info
    destroy_distributed()


def _config(opts: MegatronOptions, **raw):
    from nemo_gdro.models.gpt import transformer_config

    return transformer_config(SPEC, params_dtype=torch.bfloat16, **{**opts.transformer_config_kwargs(), **raw})


@pytest.mark.parametrize(
    "values",
    [
        FP8,
        {**FP8, "fp8": "hybrid", "fp8_recipe": "tensorwise", "fp8_wgrad": False},
        {**FP8, "fp8_recipe": "blockwise", "distributed_optimizer": True, "fp8_param": True},
        {**FP8, "fp8_recipe": "mxfp8", "first_last_layers_bf16": True, "num_layers_at_start_in_bf16": 2},
        {**FP8, "fp8_amax_history_len": 1024, "fp8_amax_compute_algo": "max", "fp8_margin": 1},
        {"recompute_granularity": "selective", "recompute_modules": ["core_attn", "mlp"]},
        {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 2},
        {**FP8, "fp8_recipe": "blockwise", "recompute_granularity": "full", "recompute_method": "block",
         "recompute_num_layers": 1},
    ],
)
def test_transformer_config_is_built_on_cpu(dist_env, values):
    opts = _build(values)
    config = _config(opts)
    for key, value in opts.transformer_config_kwargs().items():
        got = getattr(config, key)
        assert (list(got) if isinstance(value, list) else got) == value, key
    assert config.bf16 and config.params_dtype == torch.bfloat16


@pytest.mark.parametrize(
    "raw",
    [
        {"fp8_param": True},  # without fp8
        {"fp8": "e4m3", "fp8_recipe": "delayed", "first_last_layers_bf16": True},
        {"fp8": "e4m3", "fp8_recipe": "tensorwise", "first_last_layers_bf16": True, "num_layers_at_start_in_bf16": 9},
        {"recompute_granularity": "full"},
        {"recompute_granularity": "full", "recompute_method": "block"},
        {"recompute_granularity": "selective", "recompute_num_layers": 1},
    ],
)
def test_megatron_rejects_what_the_section_rejects(dist_env, raw):
    """The section's rules mirror TransformerConfig's own (which would fail later, less clearly)."""
    with pytest.raises(ValueError):
        _config(MegatronOptions(), **raw)
