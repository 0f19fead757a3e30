import pytest
import torch

from nemo_gdro.rewards.shaping import (
    OverlongConfig,
    apply_overlong_shaping,
    overlong_penalty,
    truncated_rows,
    truncation_keep_mask,
)


def test_overlong_penalty_formula():
    # L_max = 100, L_buf = 20: free up to 80, linear to -f at 100, -f beyond.
    lengths = torch.tensor([0, 50, 80, 81, 90, 99, 100, 150])
    got = overlong_penalty(lengths, max_len=100, buffer_len=20, penalty_factor=1.0)
    want = torch.tensor([0.0, 0.0, 0.0, -0.05, -0.5, -0.95, -1.0, -1.0])
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)
    half = overlong_penalty(lengths, 100, 20, penalty_factor=0.5)
    torch.testing.assert_close(half, 0.5 * want)
    assert overlong_penalty(lengths, 100, 20, penalty_factor=0.0).abs().sum() == 0


def test_overlong_penalty_matches_dapo_definition_elementwise():
    max_len, buf = 20480, 4096
    lengths = torch.arange(0, 21000, 37)
    got = overlong_penalty(lengths, max_len, buf)
    for L, p in zip(lengths.tolist(), got.tolist(), strict=True):
        if L <= max_len - buf:
            ref = 0.0
        elif L <= max_len:
            ref = ((max_len - buf) - L) / buf
        else:
            ref = -1.0
        assert p == pytest.approx(ref, abs=1e-6)


def test_apply_overlong_shaping_adds_to_rewards():
    rewards = torch.tensor([1.0, -1.0, 1.0])
    lengths = torch.tensor([10, 95, 100])
    out = apply_overlong_shaping(rewards, lengths, max_len=100, buffer_len=10)
    torch.testing.assert_close(out, torch.tensor([1.0, -1.5, 0.0]))
    with pytest.raises(ValueError, match="same shape"):
        apply_overlong_shaping(rewards, lengths[:2], 100, 10)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"max_len": 0, "buffer_len": 1}, "max response length"),
        ({"max_len": 100, "buffer_len": 0}, "buffer_tokens"),
        ({"max_len": 100, "buffer_len": 101}, "buffer_tokens"),
        ({"max_len": 100, "buffer_len": 10, "penalty_factor": -1.0}, "penalty"),
    ],
)
def test_overlong_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        overlong_penalty(torch.tensor([1]), **kwargs)


def test_overlong_config_validate():
    OverlongConfig().validate(max_len=10)  # disabled: nothing to check
    with pytest.raises(ValueError, match=r"reward.overlong.buffer_tokens must be an integer in \[1, 1024\]"):
        OverlongConfig(enabled=True, buffer_tokens=4096).validate(max_len=1024)
    OverlongConfig(enabled=True, buffer_tokens=256).validate(max_len=1024)
    with pytest.raises(ValueError, match=r"reward.overlong.buffer_tokens must be an integer >= 1"):
        OverlongConfig(buffer_tokens=0)
    with pytest.raises(ValueError, match=r"reward.overlong.penalty"):
        OverlongConfig(penalty=-0.5)


def test_truncation_mask():
    lengths = torch.tensor([5, 8, 8, 3])
    stopped = torch.tensor([True, True, False, False])
    trunc = truncated_rows(lengths, stopped, max_new_tokens=8)
    # Row 1 ended on its stop token exactly at the limit; row 3 stopped early without one (e.g. a
    # stop string) and is not truncated either.
    assert trunc.tolist() == [False, False, True, False]
    assert truncation_keep_mask(trunc).tolist() == [True, True, False, True]
    assert truncation_keep_mask(trunc, enabled=False).tolist() == [True] * 4
    with pytest.raises(ValueError, match="bool"):
        truncated_rows(lengths, stopped.long(), 8)
    with pytest.raises(ValueError, match="truncated must be a bool"):
        truncation_keep_mask(lengths)
