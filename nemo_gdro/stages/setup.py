"""The typed ``algorithm`` section: which stage does what, and each algorithm's parameters.

``algorithm.prompt_scheduler``, ``rollout_scheduler``, ``advantage_weighting``,
``token_modulation``, ``loss`` and ``group_filter`` name the stages
(:mod:`nemo_gdro.registries`); the per-algorithm sections (``prompt_gdro``,
``rollout_gdro``, ``dynamo.allocation``, ``dynamo.modulation``, ``r2vpo``,
``prompt_skip``, ``dynamic_sampling``) hold their parameters; ``replay``
(off-policy reuse of earlier groups) works with every loss. Every section's
keys and value types are checked whether or not its stage is selected, so a
typo never waits for the run that turns it on;
range checks that depend on the rollout budget (``n_min <= rollout.n <=
n_max``) apply only to the selected rollout scheduler.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from nemo_gdro.algorithms.configs import (
    AdvantageConfig,
    DifficultyConfig,
    DynamoAllocationConfig,
    DynamoModulationConfig,
    DynamicSamplingConfig,
    PolicyLossConfig,
    PromptGDROConfig,
    PromptSkipConfig,
    R2VPOConfig,
    ReplayConfig,
    RolloutGDROConfig,
    StatsConfig,
)
from nemo_gdro.typed_config import ConfigError, build_section

__all__ = ["AlgorithmSetup", "STAGE_KEYS", "RETIRED_KEYS", "MOVED_KEYS"]

#: The stage-selecting keys of ``algorithm`` and their registry names (see nemo_gdro.registries).
STAGE_KEYS = ("prompt_scheduler", "rollout_scheduler", "advantage_weighting", "token_modulation", "loss", "group_filter")

_PROMPT_GDRO_HINT = (
    "choose the stage instead: algorithm.advantage_weighting=prompt_gdro (the paper's advantage weights) "
    "or algorithm.prompt_scheduler=prompt_gdro_resample (resampling by bin)"
)
#: Keys renamed since earlier versions: old -> (new, why), written once for RETIRED_KEYS and MOVED_KEYS.
_MOVES: dict[str, tuple[str, str]] = {
    # Replay left the R2VPO section when it became available to every loss (issue 19).
    "algorithm.r2vpo.replay_ratio": ("algorithm.replay.ratio", "replay now works with every loss"),
    "algorithm.r2vpo.staleness": ("algorithm.replay.staleness", "replay now works with every loss"),
}
#: Keys of earlier versions -> what replaced them (full dotted paths).
RETIRED_KEYS: dict[str, str] = {
    "algorithm.prompt_gdro.enabled": _PROMPT_GDRO_HINT,
    "algorithm.prompt_gdro.apply": _PROMPT_GDRO_HINT,
    "algorithm.rollout_gdro.enabled": "use algorithm.rollout_scheduler=rollout_gdro",
    "algorithm.dynamo.allocation.enabled": "use algorithm.rollout_scheduler=dynamo",
    "algorithm.dynamo.modulation.enabled": "use algorithm.token_modulation=dynamo",
    "algorithm.r2vpo.enabled": "use algorithm.loss=r2vpo",
    # Pure renames: same meaning under the new name (see MOVED_KEYS).
    **{old: f"use {new} (same meaning; {why})" for old, (new, why) in _MOVES.items()},
}
#: Retired keys that are pure renames, old -> new (full dotted paths): a checkpoint's saved config is
#: upgraded by moving their values (nemo_gdro.trainer.config_upgrade).
MOVED_KEYS: dict[str, str] = {old: new for old, (new, _) in _MOVES.items()}


def _hints(path: str) -> dict[str, str]:
    prefix = path + "."
    return {k[len(prefix) :]: v for k, v in RETIRED_KEYS.items() if k.startswith(prefix) and "." not in k[len(prefix) :]}


@dataclass(frozen=True)
class AlgorithmSetup:
    """Stage names plus the typed configs of every algorithm (design.md's step, by name).

    ``rollout_gdro`` / ``dynamo_allocation`` are ``None`` unless selected
    (their bounds depend on the budget ``n_bar``); the other sections are
    always built (Prompt-GDRO's ``signal`` also drives Rollout-GDRO).
    """

    prompt_scheduler: str
    rollout_scheduler: str
    advantage_weighting: str
    token_modulation: str
    loss: str
    group_filter: str
    n_bar: int
    advantage: AdvantageConfig
    policy_loss: PolicyLossConfig
    stats: StatsConfig
    difficulty: DifficultyConfig
    prompt_gdro: PromptGDROConfig
    rollout_gdro: RolloutGDROConfig | None
    dynamo_allocation: DynamoAllocationConfig | None
    dynamo_modulation: DynamoModulationConfig
    r2vpo: R2VPOConfig
    prompt_skip: PromptSkipConfig
    replay: ReplayConfig
    dynamic_sampling: DynamicSamplingConfig

    @property
    def replays(self) -> bool:
        """Off-policy replay of earlier groups is on (``algorithm.replay.ratio > 0``, any loss)."""
        return self.replay.ratio > 0

    def describe(self) -> str:
        """One line naming the selected stages."""
        return " ".join(f"{key}={getattr(self, key)}" for key in STAGE_KEYS)

    @classmethod
    def from_dict(cls, algorithm: Mapping[str, Any], *, n_bar: int, reward_range: tuple[float, float] = (0.0, 1.0)) -> AlgorithmSetup:
        """Validate a plain ``algorithm`` mapping (as in ``conf/train.yaml``) into typed configs.

        Args:
            algorithm: the ``algorithm`` section as plain dicts and lists.
            n_bar: the mean rollout budget per prompt (``rollout.n``).
            reward_range: the verifier's ``(wrong, correct)`` rewards (Prompt-GDRO's ``failure`` signal).
        Raises:
            ConfigError naming the key; unknown stage names list the valid ones.
        """
        from nemo_gdro.registries import STAGE_REGISTRIES

        values = dict(algorithm)
        section_keys = {
            "advantage", "policy_loss", "stats", "difficulty", "prompt_gdro", "rollout_gdro", "dynamo", "r2vpo",
            "prompt_skip", "replay", "dynamic_sampling",
        }
        unknown = sorted(set(values) - section_keys - set(STAGE_KEYS))
        if unknown:
            raise ConfigError(
                f"unknown key(s) {', '.join('algorithm.' + k for k in unknown)}; valid keys of algorithm: "
                f"{', '.join(sorted(section_keys | set(STAGE_KEYS)))}"
            )
        names = {}
        for key in STAGE_KEYS:
            if key not in values:
                raise ConfigError(f"missing key algorithm.{key}")
            try:
                names[key] = STAGE_REGISTRIES[key].check(values[key])
            except ValueError as err:
                raise ConfigError(str(err)) from None

        def section(path: str) -> dict[str, Any]:
            node: Any = values
            for part in path.split("."):
                node = node.get(part) if isinstance(node, Mapping) else None
            if node is None:
                raise ConfigError(f"missing config section algorithm.{path}")
            if not isinstance(node, Mapping):
                raise ConfigError(f"algorithm.{path} must be a mapping, got {node!r}")
            return dict(node)

        dynamo = section("dynamo")
        unknown = sorted(set(dynamo) - {"allocation", "modulation"})
        if unknown:
            raise ConfigError(f"unknown key(s) {', '.join('algorithm.dynamo.' + k for k in unknown)}; valid keys: allocation, modulation")

        def build(cls: type, path: str, construct: bool = True, **extra: Any) -> Any:
            return build_section(cls, f"algorithm.{path}", section(path), extra=extra, hints=_hints(f"algorithm.{path}"), construct=construct)

        policy_loss = build(PolicyLossConfig, "policy_loss")
        pg = section("prompt_gdro")
        pg.setdefault("reward_range", list(reward_range))
        prompt_gdro = build_section(PromptGDROConfig, "algorithm.prompt_gdro", pg, hints=_hints("algorithm.prompt_gdro"))
        rollout_gdro = build(RolloutGDROConfig, "rollout_gdro", names["rollout_scheduler"] == "rollout_gdro", n_bar=n_bar)
        dynamo_allocation = build(DynamoAllocationConfig, "dynamo.allocation", names["rollout_scheduler"] == "dynamo", n_bar=n_bar)
        dynamo_modulation = build(
            DynamoModulationConfig, "dynamo.modulation", eps_low=policy_loss.eps_low, eps_high=policy_loss.eps_high
        )
        replay = build(ReplayConfig, "replay")
        if replay.ratio > 0 and names["group_filter"] != "none":
            # The replay buffer records each group's round-robin position of a one-round step;
            # the groups a filter keeps (possibly from several rounds) have no such position.
            raise ConfigError(
                f"algorithm.group_filter={names['group_filter']} cannot be combined with "
                "algorithm.replay.ratio > 0 (replay of filtered groups is not supported)"
            )
        return cls(
            **names,
            n_bar=n_bar,
            advantage=build(AdvantageConfig, "advantage"),
            policy_loss=policy_loss,
            stats=build(StatsConfig, "stats"),
            difficulty=build(DifficultyConfig, "difficulty"),
            prompt_gdro=prompt_gdro,
            rollout_gdro=rollout_gdro,
            dynamo_allocation=dynamo_allocation,
            dynamo_modulation=dynamo_modulation,
            r2vpo=build(R2VPOConfig, "r2vpo"),
            prompt_skip=build(PromptSkipConfig, "prompt_skip"),
            replay=replay,
            dynamic_sampling=build(DynamicSamplingConfig, "dynamic_sampling"),
        )
