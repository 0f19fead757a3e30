"""What a checkpoint of a run holds, and where (on top of :mod:`nemo_gdro.trainer.checkpoint`).

Files of one ``step_XXXXXXXX`` directory:

- ``controllers.pt``: every replicated component of :meth:`Components.stateful`
  (classifier, sampler or bin index, Prompt-GDRO, Rollout-GDRO, DynaMO, R²VPO
  multiplier), written once;
- ``trainer.pt``: step, phase and the latest evaluations;
- ``actor.pt`` (and ``reference.pt`` with KL) under plain DP, where every
  rank holds the same model; under TP/PP each rank's slice is per-rank;
- per-rank (``name.rankRRRRR-of-WWWWW.pt``): ``layout`` (dp/tp/pp rank and
  sizes), ``prompt_stats`` (this rank's store shard), ``replay`` (this
  rank's buffer), ``rng``;
- ``config.yaml`` and ``manifest.json``.

Resuming with another DP size reshards the store; changing TP/PP is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nemo_gdro.trainer.checkpoint import CheckpointManager, capture_rng_state, restore_rng_state
from nemo_gdro.typed_config import ConfigError

__all__ = ["TrainerState", "RunState"]


@dataclass
class TrainerState:
    """The loop's own progress: RL steps done, whether SFT is behind us, the latest evaluations."""

    step: int = 0
    sft_done: bool = False
    sft_eval: dict[str, float] = field(default_factory=dict)
    last_eval: dict[str, float] = field(default_factory=dict)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "sft_done": self.sft_done, "sft_eval": self.sft_eval, "last_eval": self.last_eval}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.sft_done = bool(state["sft_done"])
        self.sft_eval = dict(state["sft_eval"])
        self.last_eval = dict(state["last_eval"])


class RunState:
    """Saves and restores every stateful component of a run (collective on every rank)."""

    def __init__(self, components: Any, progress: TrainerState, output_dir: Path) -> None:
        self.c = components
        self.progress = progress
        d = components.dist
        self.output_dir = output_dir
        self.checkpoints = CheckpointManager(
            output_dir / "checkpoints",
            keep_last=components.cfg.trainer.keep_last_checkpoints,
            rank=d.rank,
            world_size=d.world_size,
        )

    def _layout(self) -> dict[str, int]:
        d = self.c.dist
        return {"dp_rank": d.dp_rank, "tp_rank": d.tp_rank, "pp_rank": d.pp_rank, "dp": d.data_parallel,
                "tp": d.tensor_parallel, "pp": d.pipeline_parallel}

    def _models(self) -> dict[str, Any]:
        models = {"actor": self.c.actor}
        models.update({name: item.obj for name, item in self.c.stateful().items() if item.scope == "model"})
        return models

    def save(self) -> Path:
        """Replicated state once, each rank's shards (store, replay, RNG, model-parallel actor)."""
        stateful = self.c.stateful()
        shared: dict[str, Any] = {
            "controllers": {n: s.obj.state_dict() for n, s in stateful.items() if s.scope == "replicated"},
            "trainer": self.progress.state_dict(),
        }
        per_rank: dict[str, Any] = {"layout": self._layout(), "rng": capture_rng_state()}
        per_rank.update({n: s.obj.state_dict() for n, s in stateful.items() if s.scope == "per_rank"})
        # Under plain DP every rank holds the same model; with TP/PP each holds a slice.
        model_target = per_rank if self.c.model_parallel > 1 else shared
        model_target.update({name: model.state_dict() for name, model in self._models().items()})
        path = self.checkpoints.save(self.progress.step, shared, config_yaml=self.c.cfg.to_yaml(), per_rank=per_rank)
        if self.c.cfg.checkpoint.save_hf:
            self._save_hf()
        return path

    def _save_hf(self) -> Path:
        """``<output_dir>/hf/step_XXXXXXXX`` (collective), rotated like the checkpoints."""
        from nemo_gdro.trainer.checkpoint import step_dir_name
        from nemo_gdro.trainer.hf_out import export_live, rotate

        root = self.output_dir / "hf"
        out = export_live(self.c, root / step_dir_name(self.progress.step), self.c.cfg.checkpoint.hf_dtype)
        if self.c.dist.rank == 0:
            rotate(root, self.c.cfg.trainer.keep_last_checkpoints)
        return out

    def load(self, path: Path, enter_rl: Any) -> None:
        """Restore everything from ``path``; ``enter_rl()`` switches the actor to RL first if SFT was done."""
        state = self.checkpoints.load(path)
        layouts = state["layout"]
        self.progress.load_state_dict(state["trainer"])
        if self.progress.sft_done:
            enter_rl()
        for name, model in self._models().items():
            if name not in state:
                raise ConfigError(f"checkpoint {path} has no {name} state, which this run needs (algorithm.policy_loss.kl_coef > 0?)")
            model.load_state_dict(self._model_slice(path, state[name], layouts))
        stateful = self.c.stateful()
        controllers = state["controllers"]
        for name, item in stateful.items():
            if item.scope != "replicated":
                continue
            if name not in controllers:
                raise ConfigError(
                    f"checkpoint {path} has no state for {name}, which this run uses: resume with the config the "
                    "checkpoint was written with, or start a new run (run.output_dir)"
                )
            item.obj.load_state_dict(controllers[name])
        # One store shard per saved DP rank (TP/PP peers hold copies), resharded to this DP size.
        by_dp: dict[int, Any] = {}
        for lay, shard in zip(layouts, state["prompt_stats"]):
            by_dp.setdefault(lay["dp_rank"], shard)
        self.c.store.load_resharded([by_dp[r] for r in sorted(by_dp)])
        for name, item in stateful.items():
            if item.scope == "per_rank" and name != "prompt_stats":
                shards = state.get(name)
                if shards is None:
                    raise ConfigError(f"checkpoint {path} has no {name} state, which this run uses")
                mine = [s for lay, s in zip(layouts, shards) if lay["dp_rank"] == self.c.dist.dp_rank]
                item.obj.load_state_dict(mine[0] if mine else shards[0])
        rngs = state["rng"]
        restore_rng_state(rngs[self.c.dist.rank] if len(rngs) == self.c.dist.world_size else rngs[0])

    def _model_slice(self, path: Path, saved: Any, layouts: list[dict[str, int]]) -> Any:
        """This rank's model state: the replicated one, or the slice of the same (tp, pp) position."""
        if not isinstance(saved, list):
            return saved
        mine = self._layout()
        match = [
            i for i, lay in enumerate(layouts)
            if (lay["tp"], lay["pp"], lay["tp_rank"], lay["pp_rank"]) == (mine["tp"], mine["pp"], mine["tp_rank"], mine["pp_rank"])
        ]
        if not match:
            saved_layout = (layouts[0]["tp"], layouts[0]["pp"])
            raise ConfigError(
                f"checkpoint {path} was written with (tensor_parallel, pipeline_parallel)={saved_layout}; this run uses "
                f"{(mine['tp'], mine['pp'])}. Resume with the same model-parallel layout (DP may change)."
            )
        return saved[match[0]]
