"""Verifiers by name, their option dataclasses, and the ``reward.*`` config -> verifier.

| name          | class                       | options (``reward.options.*``)                  |
|---------------|-----------------------------|-------------------------------------------------|
| ``arithmetic``  | ``ArithmeticVerifier``        | ``eos_marker``                                   |
| ``math_verify`` | ``MathVerifier``              | none (math-verify's extraction, whole response) |
| ``dapo_math``   | ``DapoMathVerifier``          | ``extract`` (dapo/boxed/math_verify_full), ``tail_chars`` |
| ``gpqa_choice`` | ``ChoiceVerifier``            | ``letters``, ``tail_chars``                      |

Verifier modules are imported on first use, so a pool worker imports only the
one it runs (and never torch). ``build_reward(cfg)`` turns the ``reward``
config section (a mapping, e.g. an OmegaConf node converted to a dict) into a
:class:`~nemo_gdro.rewards.pool.PooledVerifier`; every key is validated and a
bad one is named (``reward.timeout_s``, ``reward.options.extract``). Verifiers
that decide every row by string work (``arithmetic``, ``gpqa_choice``:
``decides_in_prepare``) start no processes whatever ``num_workers`` says.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nemo_gdro.rewards.base import Verifier
    from nemo_gdro.rewards.pool import PooledVerifier

# name -> "module:Class" (the format of the project's ``nemo_gdro.registry.Registry``); the class
# carries its options dataclass as ``Options``.
VERIFIERS: dict[str, str] = {
    "arithmetic": "nemo_gdro.rewards.arithmetic:ArithmeticVerifier",
    "math_verify": "nemo_gdro.rewards.math:MathVerifier",
    "dapo_math": "nemo_gdro.rewards.math:DapoMathVerifier",
    "gpqa_choice": "nemo_gdro.rewards.choice:ChoiceVerifier",
}


def verifier_class(name: str) -> type[Verifier]:
    """The verifier class registered as ``name``."""
    if not isinstance(name, str) or name not in VERIFIERS:
        raise ValueError(f"reward.verifier: unknown verifier {name!r}; registered: {sorted(VERIFIERS)}")
    module, cls = VERIFIERS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def parse_options(name: str, options: Mapping[str, Any] | None, key: str = "reward.options") -> Any:
    """``options`` validated into ``name``'s options dataclass (unknown keys named)."""
    options_cls = verifier_class(name).Options  # type: ignore[attr-defined]
    given = dict(options or {})
    allowed = {f.name for f in dataclasses.fields(options_cls)}
    unknown = sorted(set(given) - allowed)
    if unknown:
        raise ValueError(
            f"{key}: unknown key(s) {unknown} for verifier {name!r}; allowed: {sorted(allowed) or 'none'}"
        )
    try:
        return options_cls(**given)
    except ValueError as e:
        msg = str(e)
        raise ValueError(msg if msg.startswith(key) else f"{key}: {msg}") from e


def build_verifier(
    name: str, options: Mapping[str, Any] | None = None, correct_reward: float = 1.0, wrong_reward: float = 0.0
) -> Verifier:
    """An in-process verifier ``name`` with validated ``options`` and reward values."""
    opts = parse_options(name, options)
    return verifier_class(name)(correct_reward, wrong_reward, **dataclasses.asdict(opts))


@dataclass(frozen=True)
class RewardConfig:
    """The ``reward`` config section.

    verifier: registry name (``arithmetic`` | ``math_verify`` | ``dapo_math`` | ``gpqa_choice``).
    correct_reward / wrong_reward: reward values (``1/0``; DAPO uses ``1/-1``).
    num_workers: verification worker processes per trainer rank (0 = inline in the
        calling thread, for debugging: only the soft deadline, and only in the main thread).
    timeout_s: hard per-item wall-clock bound in seconds, from hand-off to a worker;
        past it the worker is killed and replaced and the item is a timeout (wrong).
    soft_timeout_fraction: the worker interrupts an item itself at this fraction of
        ``timeout_s`` (Python-level loops only; avoids a restart); 0 disables.
    max_tasks_per_worker: recycle a worker after this many items (0 = never).
    max_memory_mb: address-space limit of each worker (MiB, 0 = none); an item that
        exceeds it fails with MemoryError instead of pushing the node into swap/OOM.
    start_timeout_s: how long the server may take to start (import math-verify, warm
        up) and a worker to fork before it counts as a failed start (3 in a row: error).
    warmup: exercise the verifier's comparison paths in the server before forking
        workers (math-verify: about 1.5 CPU-s once per pool), so that no item pays
        sympy's first-use costs inside its deadline. Off only in tests of the plumbing.
    options: verifier-specific options (see the module table).
    """

    verifier: str = "dapo_math"
    correct_reward: float = 1.0
    wrong_reward: float = 0.0
    num_workers: int = 2
    timeout_s: float = 5.0
    soft_timeout_fraction: float = 0.8
    max_tasks_per_worker: int = 0
    max_memory_mb: int = 4096
    start_timeout_s: float = 120.0
    warmup: bool = True
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        def bad(key: str, want: str) -> ValueError:
            return ValueError(f"reward.{key} must be {want}, got {getattr(self, key)!r}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: Any) -> bool:
            return isinstance(v, int | float) and not isinstance(v, bool)

        if not isinstance(self.verifier, str) or self.verifier not in VERIFIERS:
            raise ValueError(f"reward.verifier: unknown verifier {self.verifier!r}; registered: {sorted(VERIFIERS)}")
        if not is_num(self.correct_reward) or not is_num(self.wrong_reward):
            raise ValueError(
                f"reward.correct_reward / reward.wrong_reward must be numbers, got "
                f"{self.correct_reward!r} / {self.wrong_reward!r}"
            )
        if not self.correct_reward > self.wrong_reward:
            raise ValueError(
                f"reward.correct_reward must be > reward.wrong_reward, got {self.correct_reward} <= {self.wrong_reward}"
            )
        if not is_int(self.num_workers) or self.num_workers < 0:
            raise bad("num_workers", "an integer >= 0")
        if not is_num(self.timeout_s) or not self.timeout_s > 0:
            raise bad("timeout_s", "a number > 0 (seconds)")
        if not is_num(self.soft_timeout_fraction) or not 0 <= self.soft_timeout_fraction <= 0.95:
            raise bad("soft_timeout_fraction", "a number in [0, 0.95] (0 disables)")
        if not is_int(self.max_tasks_per_worker) or self.max_tasks_per_worker < 0:
            raise bad("max_tasks_per_worker", "an integer >= 0 (0 = never recycle)")
        if not is_int(self.max_memory_mb) or (self.max_memory_mb != 0 and self.max_memory_mb < 256):
            raise bad("max_memory_mb", "0 (no limit) or an integer >= 256 (MiB)")
        if not is_num(self.start_timeout_s) or not self.start_timeout_s > 0:
            raise bad("start_timeout_s", "a number > 0 (seconds)")
        if not isinstance(self.warmup, bool):
            raise bad("warmup", "true or false")
        if not isinstance(self.options, Mapping):
            raise bad("options", "a mapping")
        parse_options(self.verifier, self.options)

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any], key: str = "reward") -> RewardConfig:
        """From a config mapping; unknown keys are an error naming them."""
        allowed = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(cfg) - allowed)
        if unknown:
            raise ValueError(f"{key}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
        values = dict(cfg)
        if values.get("options") is None:
            values["options"] = {}
        return cls(**values)


def build_reward(cfg: RewardConfig | Mapping[str, Any]) -> PooledVerifier:
    """The verifier the trainer uses: ``cfg.verifier`` behind a worker pool (or inline if ``num_workers == 0``)."""
    from nemo_gdro.rewards.pool import PooledVerifier

    if not isinstance(cfg, RewardConfig):
        cfg = RewardConfig.from_mapping(cfg)
    return PooledVerifier(cfg)
