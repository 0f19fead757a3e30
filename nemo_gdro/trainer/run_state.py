"""What a checkpoint of a run holds, and where (on top of :mod:`nemo_gdro.trainer.checkpoint`).

Files of one ``step_XXXXXXXX`` directory:

- ``controllers.pt``: every replicated component of :meth:`Components.stateful`
  (classifier, sampler or bin index, Prompt-GDRO, Rollout-GDRO, DynaMO, R²VPO
  multiplier, the divergence guard's counters), written once;
- ``trainer.json``: step, phase, the latest evaluations and the metrics /
  eval records logged since the previous checkpoint (plain JSON);
- ``data.pt``: the training set's fingerprint (prompt id -> hash of prompt
  and answer text), compared on resume;
- ``actor.pt`` (and ``reference.pt`` with KL) under plain DP, where every
  rank holds the same model; under TP/PP each rank's slice is per-rank;
- per-rank (``name.rankRRRRR-of-WWWWW.pt``): ``layout`` (dp/tp/pp rank and
  sizes), ``prompt_stats`` (this rank's store shard), ``replay`` (this
  rank's buffer), ``rng``;
- ``hf_assets/`` (HF runs): the tokenizer, ``config.json`` and generation
  config of the model, for export and eval once the model folder is gone
  (:mod:`nemo_gdro.trainer.hf_assets`);
- ``config.yaml`` and ``manifest.json``.

Every ``.pt`` file holds tensors and plain containers only and is loaded with
``torch.load(weights_only=True)``.

Resuming with another DP size reshards every per-rank component (the store
and the replay buffer: ``load_resharded`` from the shards of all saved DP
ranks); changing TP/PP is refused. A checkpoint holding non-finite weights or
optimizer state is never written, and one that does not load is skipped by
``run.resume=auto`` (:meth:`RunState.read`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nemo_gdro.trainer.checkpoint import (
    CheckpointError,
    CheckpointManager,
    capture_rng_state,
    restore_rng_state,
)
from nemo_gdro.trainer.errors import NonFiniteError
from nemo_gdro.trainer.guards import any_rank, first_nonfinite
from nemo_gdro.trainer.resume_check import (
    check_dataset,
    check_resume_config,
    dataset_fingerprint,
)
from nemo_gdro.typed_config import ConfigError

__all__ = ["TrainerState", "RunState"]

#: Checkpoint names of the algorithm stages' state (what an allowed ``algorithm.*`` change may switch on or off).
_STAGE_STATES: dict[str, str] = {
    "sampler": "the uniform prompt sampler (algorithm.prompt_scheduler=uniform)",
    "bin_index": "Prompt-GDRO resampling's bin index (algorithm.prompt_scheduler=prompt_gdro_resample)",
    "prompt_skip": "the zero-variance skip table and its sampler (algorithm.prompt_scheduler=skip_zero_variance)",
    "prompt_gdro": "Prompt-GDRO's bin scores (algorithm.advantage_weighting=prompt_gdro or "
    "algorithm.prompt_scheduler=prompt_gdro_resample)",
    "rollout_gdro": "Rollout-GDRO (algorithm.rollout_scheduler=rollout_gdro)",
    "dynamo": "DynaMO's rollout allocator (algorithm.rollout_scheduler=dynamo)",
    "dual": "R2VPO's dual multiplier (algorithm.loss=r2vpo)",
    "replay": "the replay buffer (algorithm.replay.ratio > 0)",
}


def _describe(name: str) -> str:
    return f"{name!r}, {_STAGE_STATES[name]}" if name in _STAGE_STATES else repr(name)


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
        self.sft_eval = {str(k): float(v) for k, v in dict(state["sft_eval"]).items()}
        self.last_eval = {str(k): float(v) for k, v in dict(state["last_eval"]).items()}


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
        self._fingerprint = None
        self.allowed_changes: list[Any] = []
        self._assets: dict[str, bytes] | None = None
        if d.rank == 0:
            self.assets  # read now: the model folder may be removed while the run trains
        #: The metrics / eval records of the checkpoint the run resumed from (see MetricsLogger.tail).
        self.resumed_log: dict[str, Any] | None = None

    @property
    def fingerprint(self) -> Any:
        """int64 ``[N, 2]`` (prompt id, content hash) of the training set (computed once)."""
        if self._fingerprint is None:
            self._fingerprint = dataset_fingerprint(self.c.task.train)
        return self._fingerprint

    @property
    def assets(self) -> dict[str, bytes]:
        """``hf_assets/``: the HF tokenizer and config files kept with every checkpoint
        (:mod:`nemo_gdro.trainer.hf_assets`), read once when the run is built, so that a
        model folder removed during the run does not fail its checkpoints."""
        if self._assets is None:
            from nemo_gdro.trainer.hf_assets import asset_files

            self._assets = {}
            for name, src in asset_files(self.c.cfg.model, self.c.tokenizer).items():
                try:
                    self._assets[name] = src if isinstance(src, bytes) else Path(src).read_bytes()
                except OSError:  # gone since it was listed: the other files are still worth keeping
                    continue
        return self._assets

    def _layout(self) -> dict[str, int]:
        d = self.c.dist
        return {"dp_rank": d.dp_rank, "tp_rank": d.tp_rank, "pp_rank": d.pp_rank, "dp": d.data_parallel,
                "tp": d.tensor_parallel, "pp": d.pipeline_parallel}

    def _models(self) -> dict[str, Any]:
        models = {"actor": self.c.actor}
        models.update({name: item.obj for name, item in self.c.stateful().items() if item.scope == "model"})
        return models

    # ------------------------------------------------------------------ save
    def save(self, log_tail: dict[str, Any] | None = None) -> Path:
        """Replicated state once, each rank's shards (store, replay, RNG, model-parallel actor).

        ``log_tail``: the metrics / eval records logged since the previous
        checkpoint (rank 0's :meth:`MetricsLogger.tail`), stored in ``trainer.json``.

        Raises:
            NonFiniteError: on every rank, if any rank's weights or optimizer
                state hold NaN/inf (nothing is written).
            DiskFullError: no space left (nothing is published; the previous checkpoints stay).
        """
        stateful = self.c.stateful()
        models = {name: model.state_dict() for name, model in self._models().items()}
        bad = first_nonfinite(models)
        if any_rank(bad is not None):
            where = f" ({bad})" if bad is not None else " (on another rank)"
            raise NonFiniteError(
                f"refusing to write the checkpoint of step {self.progress.step}: the weights or optimizer state hold "
                f"non-finite values{where}; the checkpoints already written are kept"
            )
        trainer = self.progress.state_dict()
        trainer["log"] = log_tail or {"since": -1, "metrics": [], "eval": []}
        shared: dict[str, Any] = {
            "controllers": {n: s.obj.state_dict() for n, s in stateful.items() if s.scope == "replicated"},
            "data": {"train": self.fingerprint},
        }
        per_rank: dict[str, Any] = {"layout": self._layout(), "rng": capture_rng_state()}
        per_rank.update({n: s.obj.state_dict() for n, s in stateful.items() if s.scope == "per_rank"})
        # Under plain DP every rank holds the same model; with TP/PP each holds a slice.
        model_target = per_rank if self.c.model_parallel > 1 else shared
        model_target.update(models)
        path = self.checkpoints.save(
            self.progress.step, shared, config_yaml=self.c.cfg.to_yaml(), per_rank=per_rank, plain={"trainer": trainer},
            attachments=self.assets if self.c.dist.rank == 0 else None,
        )
        if self.c.cfg.checkpoint.save_hf:
            self._save_hf(path)
        return path

    def _save_hf(self, checkpoint: Path) -> Path:
        """``<output_dir>/hf/step_XXXXXXXX`` (collective), rotated like the checkpoints."""
        from nemo_gdro.trainer.checkpoint import step_dir_name
        from nemo_gdro.trainer.hf_assets import ASSETS_DIR
        from nemo_gdro.trainer.hf_out import export_live, rotate

        root = self.output_dir / "hf"
        out = export_live(
            self.c, root / step_dir_name(self.progress.step), self.c.cfg.checkpoint.hf_dtype,
            step=self.progress.step, assets=checkpoint / ASSETS_DIR,
        )
        if self.c.dist.rank == 0:
            rotate(root, self.c.cfg.trainer.keep_last_checkpoints)
        return out

    # ------------------------------------------------------------------ load
    def read(self, path: Path) -> dict[str, Any]:
        """Every file of ``path``, checked: it loads safely, has the components of a run
        checkpoint and finite weights and optimizer state.

        Raises:
            CheckpointError: the checkpoint does not load (``run.resume=auto``
                moves on to an older one).
        """
        state = self.checkpoints.load(path)
        for name in ("trainer", "layout", "controllers", "rng", "actor"):
            if name not in state:
                raise CheckpointError(f"{path}: not a run checkpoint of this version (it has no {name!r} component)")
        models = {name: state[name] for name in self._models() if name in state}
        bad = first_nonfinite(models)
        if bad is not None:
            raise CheckpointError(f"{path}: holds non-finite values in {bad}")
        return state

    def check(self, path: Path, state: dict[str, Any]) -> list[str]:
        """Refuse a checkpoint this run must not continue (ConfigError); returns notes to print.

        Compares the stored ``config.yaml`` (see :func:`check_resume_config`),
        the model-parallel layout and the training data's fingerprint.
        """
        cfg = self.c.cfg
        allow = cfg.run.allow_config_change
        changes = check_resume_config(self.checkpoints.read_config(path), cfg.tree, allow, str(path))
        files = [c for c in changes if c.kind == "data_files"]
        spelled = [c for c in changes if c.kind == "same_path"]
        passed = [c for c in changes if c.kind in ("safe", "allowed")]
        #: Allowed changes the restore must know of (a stage switched on or off by an allowed change).
        self.allowed_changes = [c for c in changes if c.kind == "allowed"]
        notes = [f"config changes on resume (allowed): {'; '.join(str(c) for c in passed)}"] if passed else []
        if spelled:
            notes.append(f"paths spelled otherwise, same files: {'; '.join(str(c) for c in spelled)}")
        layouts = state["layout"]
        mine = self._layout()
        saved = sorted({(lay["tp"], lay["pp"]) for lay in layouts})
        if saved != [(mine["tp"], mine["pp"])]:
            raise ConfigError(
                f"checkpoint {path} was written with (parallel.tensor_parallel, parallel.pipeline_parallel)="
                f"{saved[0]}; this run uses {(mine['tp'], mine['pp'])}. Resume with the same model-parallel layout "
                "(the data-parallel size may change)"
            )
        data_note = check_dataset(state.get("data", {}).get("train"), self.fingerprint, allow, str(path), files)
        if data_note:
            notes.append(data_note)
        return notes

    def load(self, path: Path, enter_rl: Any, state: dict[str, Any] | None = None) -> None:
        """Restore everything from ``path`` (read and checked unless ``state`` is given);
        ``enter_rl()`` switches the actor to RL first if SFT was done."""
        if state is None:
            state = self.read(path)
            self.check(path, state)
        layouts = state["layout"]
        trainer = dict(state["trainer"])
        self.resumed_log = trainer.pop("log", None)
        self.progress.load_state_dict(trainer)
        if self.progress.sft_done:
            enter_rl()
        for name, model in self._models().items():
            if name not in state:
                raise ConfigError(f"checkpoint {path} has no {name} state, which this run needs (algorithm.policy_loss.kl_coef > 0?)")
            self._restore(path, name, model, self._model_slice(path, state[name], layouts))
        stateful = self.c.stateful()
        controllers = state["controllers"]
        fresh = self._fresh_stages(path, state, stateful)
        for name, item in stateful.items():
            if item.scope != "replicated" or name in fresh:
                continue
            if name not in controllers:
                raise ConfigError(
                    f"checkpoint {path} has no state for {name}, which this run uses: resume with the config the "
                    "checkpoint was written with, or start a new run (run.output_dir)"
                )
            self._restore(path, name, item.obj, controllers[name])
        for name, item in stateful.items():
            if item.scope != "per_rank" or name in fresh:
                continue
            shards = state.get(name)
            if shards is None:
                raise ConfigError(f"checkpoint {path} has no {name} state, which this run uses")
            # One shard per saved DP rank (TP/PP peers hold copies), resharded to this DP size.
            by_dp: dict[int, Any] = {}
            for lay, shard in zip(layouts, shards):
                by_dp.setdefault(lay["dp_rank"], shard)
            self._restore(path, name, item.obj, [by_dp[r] for r in sorted(by_dp)], resharded=True)
        rngs = state["rng"]
        restore_rng_state(rngs[self.c.dist.rank] if len(rngs) == self.c.dist.world_size else rngs[0])

    def _fresh_stages(self, path: Path, state: dict[str, Any], stateful: dict[str, Any]) -> set[str]:
        """Algorithm stages switched on or off by an allowed ``algorithm.*`` change, each named in a warning.

        A stage this run uses that the checkpoint has no state for starts from its
        initial state (returned); a stage's state the checkpoint holds that this run
        does not use is ignored. Without an allowed algorithm change neither happens
        (the config check refused the change; a missing state is an error in :meth:`load`).
        """
        keys = [c.key for c in self.allowed_changes if c.key.startswith("algorithm.")]
        if not keys:
            return set()
        switchable = set(self.c.stages.stateful()) | set(self.c.replay.stateful())
        saved = set(state["controllers"]) | {name for name in state if name in _STAGE_STATES}
        on = sorted(name for name in switchable & set(stateful) if name not in saved)
        off = sorted(name for name in saved & set(_STAGE_STATES) if name not in stateful)
        changed = ", ".join(keys[:4]) + (", ..." if len(keys) > 4 else "")
        if self.c.dist.rank == 0:
            for name in on:
                warnings.warn(
                    f"run.allow_config_change ({changed}): checkpoint {path} holds no state for {_describe(name)}, "
                    "switched on by the allowed change; it starts from its initial state",
                    stacklevel=3,
                )
            for name in off:
                warnings.warn(
                    f"run.allow_config_change ({changed}): checkpoint {path} holds state for {_describe(name)}, "
                    "which this run no longer uses; it is ignored",
                    stacklevel=3,
                )
        return set(on)

    @staticmethod
    def _restore(path: Path, name: str, obj: Any, value: Any, resharded: bool = False) -> None:
        """``obj.load_state_dict(value)`` (or ``load_resharded``), its errors as one ConfigError naming both."""
        try:
            if resharded:
                obj.load_resharded(value)
            else:
                obj.load_state_dict(value)
        except (ValueError, KeyError, TypeError, RuntimeError) as err:
            raise ConfigError(
                f"checkpoint {path}: cannot restore {name}: {err}. Was it written with another config? Resume "
                "with the checkpoint's config or start a new run (another run.output_dir)"
            ) from None

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
