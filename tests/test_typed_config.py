"""Typed config sections: unknown keys, wrong types and retired keys are errors naming the key."""

from dataclasses import dataclass, field
from typing import Literal

import pytest

from nemo_gdro.typed_config import ConfigError, build_section


@dataclass(frozen=True)
class Section:
    steps: int = 1
    rate: float = 0.5
    flag: bool = False
    mode: Literal["a", "b"] = "a"
    cap: float | None = None
    pair: tuple[float, float] = (0.0, 1.0)
    edges: tuple[float, ...] = ()
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"s.steps must be >= 1, got {self.steps}")


def test_values_are_checked_and_coerced():
    s = build_section(Section, "s", {"steps": 3, "rate": 2, "flag": True, "mode": "b", "cap": 4, "pair": [1, 2], "edges": [0.1]})
    assert (s.steps, s.rate, s.flag, s.mode, s.cap, s.pair, s.edges) == (3, 2.0, True, "b", 4.0, (1.0, 2.0), (0.1,))
    assert isinstance(s.rate, float) and build_section(Section, "s", {"cap": None}).cap is None


@pytest.mark.parametrize(
    "values, message",
    [
        ({"steps": True}, "s.steps must be an integer"),
        ({"steps": 1.5}, "s.steps must be an integer"),
        ({"steps": "3"}, "s.steps must be an integer"),
        ({"rate": "abc"}, "s.rate must be a number"),
        ({"rate": False}, "s.rate must be a number"),
        ({"flag": 1}, "s.flag must be true or false"),
        ({"mode": "c"}, "s.mode must be one of 'a' | 'b'"),
        ({"cap": "x"}, "s.cap must be"),
        ({"pair": [1.0]}, r"s.pair must be a list of 2"),
        ({"edges": [0.1, "x"]}, r"s.edges\[1\] must be a number"),
        ({"extra": 3}, "s.extra must be a mapping"),
        ({"steps": 0}, "s.steps must be >= 1"),
        ({"temprature": 0.5}, r"unknown key\(s\) s.temprature; valid keys of s: cap, edges"),
    ],
)
def test_bad_values_name_the_key(values, message):
    with pytest.raises(ConfigError, match=message):
        build_section(Section, "s", values)


def test_retired_keys_say_what_replaced_them_and_construct_false_checks_only():
    with pytest.raises(ConfigError, match="s.enabled was removed: use x"):
        build_section(Section, "s", {"enabled": True}, hints={"enabled": "use x"})
    assert build_section(Section, "s", {"steps": 0}, construct=False) is None  # ranges not checked
    with pytest.raises(ConfigError, match="s.steps must be an integer"):
        build_section(Section, "s", {"steps": "0"}, construct=False)  # types still are
