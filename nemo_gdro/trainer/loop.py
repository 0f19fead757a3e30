"""The training run: optional SFT warm start, then RL steps, evaluation and checkpoints.

``Trainer`` owns the run's lifetime (build, resume, phases, logging,
checkpoints, teardown); the components come from
:func:`~nemo_gdro.trainer.components.build_components`, one RL step is
:class:`~nemo_gdro.trainer.step.RLStep`, the checkpoint layout is
:class:`~nemo_gdro.trainer.run_state.RunState`. Every decision is a
deterministic function of the config seed, the step and the checkpointed
state, so a resumed run repeats the uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from nemo_gdro.trainer.components import Components, build_components
from nemo_gdro.trainer.config import validate
from nemo_gdro.trainer.phases import evaluate, run_sft
from nemo_gdro.trainer.run_config import RunConfig
from nemo_gdro.trainer.run_state import RunState, TrainerState
from nemo_gdro.trainer.step import RLStep
from nemo_gdro.typed_config import ConfigError

__all__ = ["RunResult", "Trainer", "train"]


@dataclass
class RunResult:
    output_dir: Path
    steps_done: int
    final_eval: dict[str, float]
    sft_eval: dict[str, float]


class Trainer:
    """Builds every component of a run; ``run()`` trains to ``trainer.max_steps``.

    Args:
        cfg: a composed config tree (validated here) or an already typed :class:`RunConfig`.
    """

    def __init__(self, cfg: DictConfig | RunConfig) -> None:
        self.cfg: RunConfig = cfg if isinstance(cfg, RunConfig) else validate(cfg)
        self.output_dir = Path(self.cfg.run.output_dir).resolve()
        self.components: Components = build_components(self.cfg)
        try:
            self.progress = TrainerState()
            self.state = RunState(self.components, self.progress, self.output_dir)
            self.rl_step = RLStep(self.components)
        except BaseException:
            self.close()
            raise
        self.is_main = self.components.dist.rank == 0

    @property
    def step(self) -> int:
        """RL steps done."""
        return self.progress.step

    # ------------------------------------------------------------------ phases
    def _enter_rl_phase(self) -> None:
        """Switch the actor's optimizer to the RL settings; freeze the KL reference (if any)."""
        c = self.components
        c.actor.reset_optimizer(c.rl_optim)
        c.reference.freeze_from(c.actor)

    def _push_weights(self) -> None:
        self.components.engine.load_weights(self.components.actor.export_hf_state_dict(), version=self.progress.step)

    def _evaluate(self, step: int) -> dict[str, float]:
        return evaluate(self.components, step, self.cfg.eval.k, self.cfg.seed)

    def _warm_start(self, logger) -> None:
        """SFT (when configured) with evaluations before and after; ends in a checkpoint at step 0."""
        self._push_weights()
        sft = self.cfg.sft
        if sft.steps > 0:
            before = self._evaluate(-1)
            logger.log_eval(0, {f"{k}/before_sft": v for k, v in before.items()})
            logger.log(0, run_sft(self.components, sft.steps, sft.batch_size, self.cfg.seed))
        self.progress.sft_done = True
        self._enter_rl_phase()
        self._push_weights()
        self.progress.sft_eval = self.progress.last_eval = self._evaluate(0)
        logger.log_eval(0, self.progress.sft_eval)
        if self.is_main:
            label = "after SFT" if sft.steps > 0 else "at start"
            print(f"[nemo-gdro] {label}: {_fmt(self.progress.sft_eval)}", flush=True)
        self.state.save()

    # ------------------------------------------------------------------- run
    def _resume(self) -> None:
        resume = self.cfg.run.resume
        fresh = resume is None or resume.lower() == "none"
        checkpoints = self.state.checkpoints
        # latest() re-hashes whole checkpoints: look once.
        if fresh and checkpoints.list_checkpoints() and checkpoints.latest() is not None:
            raise ConfigError(
                f"{self.output_dir} already holds checkpoints: pass run.resume=auto to continue that run "
                "or choose another run.output_dir / run.name"
            )
        path = None if fresh else checkpoints.resolve_resume(resume)
        if path is not None:
            self.state.load(path, self._enter_rl_phase)
            self._push_weights()
            print(f"[nemo-gdro] resumed from {path} at step {self.step}", flush=True)
        self.resumed = path is not None

    def run(self) -> RunResult:
        from nemo_gdro.trainer.metrics import open_logger

        cfg, c = self.cfg, self.components
        self._resume()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        logger = open_logger(self.output_dir, cfg.logging, main=self.is_main, resume_step=self.step if self.resumed else None)
        d = c.dist
        print(
            f"[nemo-gdro rank {d.rank}/{d.world_size}] dp {d.dp_rank}/{d.data_parallel} tp {d.tp_rank}/"
            f"{d.tensor_parallel} pp {d.pp_rank}/{d.pipeline_parallel} backend {d.backend}: {cfg.algorithm.describe()}",
            flush=True,
        )
        try:
            if not self.progress.sft_done:
                self._warm_start(logger)
            self._rl_steps(logger)
        except BaseException:
            c.close()  # no verification worker outlives a failed run, with or without close()
            raise
        finally:
            logger.close()
        return self._finish()

    def _rl_steps(self, logger) -> None:
        from nemo_gdro.trainer.metrics import ProgressBar

        t = self.cfg.trainer
        progress = ProgressBar(t.max_steps) if (self.cfg.logging.progress and self.is_main) else None
        while self.step < t.max_steps:
            metrics = self.rl_step(self.step)
            self.progress.step += 1
            step = self.step
            logger.log(step, metrics)
            if progress is not None:
                progress.update(
                    step, reward=metrics["train/reward_mean"], pass_rate=metrics["train/pass_rate"],
                    step_time=metrics["time/step_s"],
                )
            last = step == t.max_steps
            if last or (t.eval_every and step % t.eval_every == 0):
                self.progress.last_eval = self._evaluate(step)
                logger.log_eval(step, self.progress.last_eval)
            if last or (t.checkpoint_every and step % t.checkpoint_every == 0):
                self.state.save()
        if progress is not None:
            progress.close()

    def _finish(self) -> RunResult:
        result = RunResult(self.output_dir, self.step, self.progress.last_eval, self.progress.sft_eval)
        if not self.is_main:
            return result
        from nemo_gdro.trainer.plots import make_plots, write_summary

        plots = make_plots(self.output_dir)
        summary = write_summary(self.output_dir)
        out = self.output_dir
        print(f"[nemo-gdro] done: {self.step} RL steps. eval at start of RL: {_fmt(self.progress.sft_eval)}", flush=True)
        print(f"[nemo-gdro] eval at step {self.step}: {_fmt(self.progress.last_eval)}", flush=True)
        print(f"[nemo-gdro] metrics: {out / 'metrics.jsonl'} (TensorBoard: {out})", flush=True)
        print(f"[nemo-gdro] plots:   {out / 'plots'} ({len(plots)} PNG); summary: {summary}", flush=True)
        return result

    # ----------------------------------------------------------------- lifetime
    def close(self) -> None:
        """Stop the verifiers' worker processes and tear down the process groups this trainer initialised."""
        from nemo_gdro.parallel.distributed import destroy_distributed

        try:
            self.components.close()
        finally:
            destroy_distributed()

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _fmt(metrics: dict[str, float]) -> str:
    keys = [k for k in metrics if "/band_" not in k]
    return ", ".join(f"{k.split('/', 1)[1]} {metrics[k]:.3f}" for k in keys)


def train(overrides: list[str] | None = None, config_name: str = "train") -> RunResult:
    """Compose the config with ``overrides`` and run training."""
    from nemo_gdro.trainer.config import compose

    with Trainer(compose(config_name, overrides)) as trainer:
        return trainer.run()
