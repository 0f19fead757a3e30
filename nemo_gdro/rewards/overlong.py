"""``reward.overlong``: the options of DAPO's soft overlong punishment and their checks.

No torch: the run config checks them before anything heavy is imported. The
penalty itself is :func:`nemo_gdro.rewards.shaping.overlong_penalty`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class OverlongConfig:
    """``reward.overlong``: DAPO's soft overlong punishment.

    enabled: add the overlong penalty to the rewards.
    buffer_tokens: ``L_buf`` in tokens (DAPO recipes: 4096 of 20480; 1 <= buffer_tokens <= L_max,
        ``L_max`` = ``rollout.max_new_tokens``).
    penalty: the full penalty ``f`` >= 0 (DAPO: 1.0).
    """

    enabled: bool = False
    buffer_tokens: int = 4096
    penalty: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.buffer_tokens, bool) or not isinstance(self.buffer_tokens, int) or self.buffer_tokens < 1:
            raise ValueError(f"reward.overlong.buffer_tokens must be an integer >= 1, got {self.buffer_tokens!r}")
        if isinstance(self.penalty, bool) or not isinstance(self.penalty, int | float) or not 0 <= self.penalty < float("inf"):
            raise ValueError(f"reward.overlong.penalty must be a finite number >= 0, got {self.penalty!r}")

    def validate(self, max_len: int, key: str = "reward.overlong") -> None:
        """Check the options against ``max_len`` (= ``L_max``, the max response tokens)."""
        if not self.enabled:
            return
        check_overlong_args(max_len, self.buffer_tokens, self.penalty, key)


def check_overlong_args(max_len: int, buffer_len: int, penalty_factor: float, key: str = "reward.overlong") -> None:
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
        raise ValueError(f"{key}: max response length must be an integer >= 1, got {max_len!r}")
    if isinstance(buffer_len, bool) or not isinstance(buffer_len, int) or not 1 <= buffer_len <= max_len:
        raise ValueError(
            f"{key}.buffer_tokens must be an integer in [1, {max_len}] (rollout.max_new_tokens), got {buffer_len!r}"
        )
    if isinstance(penalty_factor, bool) or not isinstance(penalty_factor, int | float) or penalty_factor < 0:
        raise ValueError(f"{key}.penalty must be a number >= 0, got {penalty_factor!r}")
