"""FP8 rules as pure functions: hardware table, alignment, padding multiples, GEMM shapes, TE detection."""

from __future__ import annotations

import importlib.util

import pytest

from nemo_gdro.models import fp8
from nemo_gdro.models.gpt import PRESETS


@pytest.mark.parametrize(
    "recipe, sm, cuda, fragment",
    [
        ("delayed", 89, (12, 1), None),  # Ada
        ("tensorwise", 90, (12, 4), None),
        ("delayed", 86, (12, 8), "compute capability >= 8.9"),  # Ampere: no FP8 tensor cores
        ("tensorwise", 80, (12, 8), "compute capability >= 8.9"),
        ("blockwise", 90, (12, 8), "CUDA >= 12.9"),  # H100 with an older toolkit
        ("blockwise", 90, (12, 9), None),
        ("blockwise", 90, (13, 0), None),
        ("blockwise", 90, None, "no CUDA"),
        ("blockwise", 89, (12, 9), "Hopper"),
        ("blockwise", 100, (12, 8), None),  # Blackwell: power-of-2 scales, no toolkit rule
        ("mxfp8", 90, (13, 0), "Blackwell"),
        ("mxfp8", 100, (12, 8), None),
        ("mxfp8", 120, (12, 8), None),
    ],
)
def test_hardware_table(recipe, sm, cuda, fragment):
    error = fp8.fp8_hardware_error(recipe, sm, cuda)
    if fragment is None:
        assert error is None
    else:
        assert error is not None and fragment in error, error


def test_unknown_recipe_is_rejected():
    with pytest.raises(ValueError, match="fp8 recipe 'fp4'"):
        fp8.fp8_hardware_error("fp4", 90, (12, 9))


@pytest.mark.parametrize("text, parsed", [("12.8", (12, 8)), ("13.0", (13, 0)), ("12", (12, 0)), (None, None), ("", None)])
def test_parse_cuda_version(text, parsed):
    assert fp8.parse_cuda_version(text) == parsed


@pytest.mark.parametrize(
    "recipe, tp, sp, multiple",
    [
        (None, 1, False, 1),
        (None, 4, True, 4),  # sequence parallelism alone: S divisible by TP
        ("delayed", 4, False, 16),
        ("tensorwise", 1, False, 16),
        ("mxfp8", 2, False, 32),
        ("blockwise", 1, False, 128),
        ("blockwise", 4, True, 512),  # each TP rank holds S / 4 positions, still a multiple of 128
        ("mxfp8", 8, True, 256),
    ],
)
def test_sequence_multiple(recipe, tp, sp, multiple):
    assert fp8.sequence_multiple(recipe, tp, sp) == multiple


def test_padded_length():
    assert [fp8.padded_length(n, 16) for n in (0, 1, 15, 16, 17, 33)] == [0, 16, 16, 16, 32, 48]
    assert fp8.padded_length(37, 1) == 37
    with pytest.raises(ValueError):
        fp8.padded_length(5, 0)


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
@pytest.mark.parametrize("preset", ["qwen3_0p6b", "qwen3_1p7b", "qwen3_4b", "qwen3_8b"])
def test_qwen3_gemm_shapes_are_aligned_for_every_recipe(preset, tp):
    s = PRESETS[preset]
    shapes = fp8.fp8_gemm_shapes(s.hidden_size, s.ffn_hidden_size, s.num_attention_heads, s.num_query_groups,
                                 s.kv_channels, tp)
    for recipe in fp8.FP8_RECIPES:
        errors = fp8.fp8_shape_errors(shapes, recipe)
        if (preset, tp, recipe) == ("qwen3_4b", 8, "blockwise"):
            # Qwen3-4B's ffn 9728 / 8 = 1216 = 9.5 x 128: blockwise needs TP <= 4 there.
            assert errors == ["linear_fc2 [2560, 1216] (needs multiples of 128)"]
        else:
            assert errors == [], (preset, tp, recipe)


def test_qwen3_8b_shapes_per_tp_rank():
    s = PRESETS["qwen3_8b"]
    shapes = fp8.fp8_gemm_shapes(s.hidden_size, s.ffn_hidden_size, s.num_attention_heads, s.num_query_groups,
                                 s.kv_channels, 8)
    # qkv out 6144 / TP, o_proj in 4096 / TP, fc1 out 2 * 12288 / TP, fc2 in 12288 / TP.
    assert shapes == {
        "linear_qkv": (768, 4096),
        "linear_proj": (4096, 512),
        "linear_fc1": (3072, 4096),
        "linear_fc2": (4096, 1536),
    }


def test_misaligned_shapes_are_named():
    shapes = fp8.fp8_gemm_shapes(hidden=64, ffn=128, heads=4, groups=2, head_dim=16, tp=1)  # the tiny preset
    assert fp8.fp8_shape_errors(shapes, "delayed") == []
    errors = fp8.fp8_shape_errors(shapes, "blockwise")
    assert errors[0] == "linear_qkv [128, 64] (needs multiples of 128)" and len(errors) == 4


def test_fp8_environment():
    assert fp8.fp8_environment("blockwise", 90) == {"NVTE_FP8_BLOCK_SCALING_FP32_SCALES": "1"}
    assert fp8.fp8_environment("blockwise", 100) == {}  # Blackwell: power-of-2 scales only
    assert fp8.fp8_environment("delayed", 90) == {} and fp8.fp8_environment(None, None) == {}
    environ = {"NVTE_FP8_BLOCK_SCALING_FP32_SCALES": "0"}
    fp8.apply_fp8_environment({"NVTE_FP8_BLOCK_SCALING_FP32_SCALES": "1", "OTHER": "x"}, environ)
    assert environ == {"NVTE_FP8_BLOCK_SCALING_FP32_SCALES": "0", "OTHER": "x"}  # a user's setting wins


def test_te_detection(monkeypatch):
    assert fp8.te_installed() == (importlib.util.find_spec("transformer_engine") is not None)
    monkeypatch.setattr(fp8, "te_installed", lambda: False)
    assert fp8.te_usable_by_megatron() is False


def test_te_usable_follows_megatrons_have_te(monkeypatch):
    gpt_layer_specs = pytest.importorskip("megatron.core.models.gpt.gpt_layer_specs")
    monkeypatch.setattr(fp8, "te_installed", lambda: True)
    monkeypatch.setattr(gpt_layer_specs, "HAVE_TE", False)  # e.g. a bare TE wheel without its torch extension
    assert fp8.te_usable_by_megatron() is False
    monkeypatch.setattr(gpt_layer_specs, "HAVE_TE", True)
    assert fp8.te_usable_by_megatron() is True
