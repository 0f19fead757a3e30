"""The training run: optional SFT warm start, then RL steps, evaluation and checkpoints.

``Trainer`` owns the run's lifetime (build, resume, phases, logging,
checkpoints, teardown); the components come from
:func:`~nemo_gdro.trainer.components.build_components`, one RL step is
:class:`~nemo_gdro.trainer.step.RLStep`, the checkpoint layout is
:class:`~nemo_gdro.trainer.run_state.RunState`. Every decision is a
deterministic function of the config seed, the step and the checkpointed
state, so a resumed run repeats the uninterrupted one.

Before anything is built: the layout is checked against the processes
launched, rank 0 takes the output directory's lock
(:class:`~nemo_gdro.trainer.run_lock.RunLock`), and the checkpoint to resume
is found and its config compared with this run's
(:mod:`~nemo_gdro.trainer.resume_check`). SIGTERM / SIGINT end the run after
the current step with a checkpoint (:mod:`~nemo_gdro.trainer.stop`); a
collective that times out (``parallel.timeout_s``) ends it with one line.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from nemo_gdro.models.hf_preflight import check_hf_inputs
from nemo_gdro.trainer.checkpoint import CheckpointError, CheckpointManager
from nemo_gdro.trainer.components import Components, Stateful, build_components, tear_down
from nemo_gdro.trainer.config import validate
from nemo_gdro.trainer.errors import CollectiveTimeout, NonFiniteError, RunError, RunInterrupted
from nemo_gdro.trainer.guards import UpdateGuard, any_rank, sampling_failure
from nemo_gdro.trainer.phases import evaluate, no_eval_suites, run_sft
from nemo_gdro.trainer.preflight import check_world_size
from nemo_gdro.trainer.resume_check import check_resume_config
from nemo_gdro.trainer.run_config import RunConfig
from nemo_gdro.trainer.run_lock import RunLock
from nemo_gdro.trainer.run_state import RunState, TrainerState
from nemo_gdro.trainer.step import RLStep
from nemo_gdro.trainer.stop import StopSignals
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
        from nemo_gdro.parallel.launch import detect_launch_env

        self.cfg: RunConfig = cfg if isinstance(cfg, RunConfig) else validate(cfg)
        self.output_dir = Path(self.cfg.run.output_dir).resolve()
        launch = detect_launch_env()
        check_world_size(self.cfg.parallel, launch.world_size)
        check_hf_inputs(self.cfg)  # a damaged checkpoint is one line before the data or the model is built
        # One writer per directory: rank 0 locks it before anything reads or writes there.
        self.lock: RunLock | None = RunLock(self.output_dir) if launch.rank == 0 else None
        self.components: Components | None = None
        try:
            self._candidates = self._plan_resume()
            self.components = build_components(self.cfg)
            self.progress = TrainerState()
            self.state = RunState(self.components, self.progress, self.output_dir)
            t = self.cfg.trainer
            self.guard = UpdateGuard(t.on_nonfinite, t.max_consecutive_skips)
            self.components.extra_state["guard"] = Stateful(self.guard)
            self.rl_step = RLStep(self.components, guard=self.guard)
        except BaseException:
            self.close()
            raise
        self.is_main = self.components.dist.rank == 0
        self.resumed = False
        # data=math without data.eval_files: evaluation is optional (run() says so once).
        self.evaluates = bool(self.components.task.eval_suites)

    @property
    def step(self) -> int:
        """RL steps done."""
        return self.progress.step

    # ------------------------------------------------------------------ phases
    def _enter_rl_phase(self) -> None:
        """Switch the actor's optimizer to the RL settings; freeze the KL reference (if any)."""
        self.components.enter_rl_phase()

    def _push_weights(self) -> None:
        self.components.engine.load_weights(self.components.actor.export_hf_state_dict(), version=self.progress.step)

    def _evaluate(self, step: int) -> dict[str, float]:
        """Held-out metrics at ``step``; ``{}`` (nothing logged) when the task has no eval suites."""
        if not self.evaluates:
            return {}
        try:
            return evaluate(self.components, step, self.cfg.eval.k, self.cfg.seed)
        except RuntimeError as err:
            raise (sampling_failure(err, max(step, 0), "evaluation") or err) from err

    def _warm_start(self, logger) -> None:
        """SFT (when configured) with evaluations before and after; ends in a checkpoint at step 0."""
        self._push_weights()
        sft, at_start = self.cfg.sft, self.cfg.eval.at_start
        if sft.steps > 0:
            if at_start:
                before = self._evaluate(-1)
                if before:
                    logger.log_eval(0, {f"{k}/before_sft": v for k, v in before.items()})
            sft_metrics = run_sft(self.components, sft.steps, sft.batch_size, self.cfg.seed)
            logger.log(0, sft_metrics)
            if not (math.isfinite(sft_metrics["sft/loss"]) and self.components.actor.weights_finite()):
                raise NonFiniteError(
                    f"the SFT warm start diverged (last loss {sft_metrics['sft/loss']}, weights "
                    f"{'finite' if self.components.actor.weights_finite() else 'non-finite'}): lower sft.lr; "
                    "nothing was checkpointed"
                )
        self.progress.sft_done = True
        self._enter_rl_phase()
        self._push_weights()
        if at_start and self.evaluates:
            self.progress.sft_eval = self.progress.last_eval = self._evaluate(0)
            logger.log_eval(0, self.progress.sft_eval)
            if self.is_main:
                label = "after SFT" if sft.steps > 0 else "at start"
                print(f"[nemo-gdro] {label}: {_fmt(self.progress.sft_eval)}", flush=True)
        if self.cfg.checkpoint.at_start:
            self._save(logger)

    def _save(self, logger) -> Path:
        """A checkpoint of the current step holding the records logged since the previous one."""
        path = self.state.save(log_tail=logger.tail())
        logger.mark_checkpoint(self.step)
        return path

    # ------------------------------------------------------------------- run
    def _plan_resume(self) -> Iterator[Path]:
        """The checkpoints to try, newest first (before anything is built; every rank).

        ``run.resume=null`` refuses a directory that holds checkpoints; an
        explicit path must be a valid checkpoint; the first candidate's config
        is compared with this run's here, so a refused change fails in seconds.
        """
        resume = self.cfg.run.resume
        fresh = resume is None or resume.lower() in ("none", "null")
        checkpoints = CheckpointManager(self.output_dir / "checkpoints")
        # latest() re-hashes whole checkpoints: look once.
        if fresh:
            if checkpoints.list_checkpoints() and checkpoints.latest() is not None:
                raise ConfigError(
                    f"{self.output_dir} already holds checkpoints: pass run.resume=auto to continue that run "
                    "or choose another run.output_dir / run.name"
                )
            return iter(())
        self._explicit_resume = resume.strip().lower() != "auto"
        candidates = iter([checkpoints.resolve_resume(resume)]) if self._explicit_resume else checkpoints.candidates()
        first = next(candidates, None)
        if first is None:
            return iter(())
        check_resume_config(
            checkpoints.read_config(first), self.cfg.tree, self.cfg.run.allow_config_change, str(first)
        )
        return itertools.chain([first], candidates)

    def _resume(self) -> None:
        """Load the newest candidate that loads (``auto`` skips, with a warning, one that does not)."""
        path = None
        for candidate in self._candidates:
            try:
                state, problem = self.state.read(candidate), None
            except CheckpointError as err:
                state, problem = None, str(err)
            # Every rank reads the same files; all skip or none does.
            if any_rank(problem is not None):
                problem = problem or f"{candidate} does not load on another rank"
                if getattr(self, "_explicit_resume", False):
                    raise CheckpointError(f"run.resume={candidate}: {problem}")
                warnings.warn(f"run.resume=auto: skipping checkpoint {candidate}: {problem}", stacklevel=2)
                continue
            notes = self.state.check(candidate, state)
            self.state.load(candidate, self._enter_rl_phase, state)
            path = candidate
            if self.is_main:
                for note in notes:
                    print(f"[nemo-gdro] {note}", flush=True)
            break
        if path is not None:
            self._push_weights()
            print(f"[nemo-gdro] resumed from {path} at step {self.step}", flush=True)
        self.resumed = path is not None

    def run(self) -> RunResult:
        """Train to ``trainer.max_steps``; raises :class:`RunError` subclasses with one-line messages."""
        import torch.distributed as dist

        try:
            return self._run()
        except (RunError, ConfigError, CheckpointError):
            raise
        except (dist.DistError, RuntimeError) as err:
            text = str(err)
            if isinstance(err, dist.DistError) or "timed out" in text.lower() or "timeout" in text.lower():
                t = self.cfg.parallel.timeout_s
                if "timed out" in text.lower() or "timeout" in text.lower():
                    raise CollectiveTimeout(
                        f"a collective did not complete within parallel.timeout_s={t:g} s during step {self.step + 1}: "
                        "a rank stalled or died (see the other ranks' output); the last checkpoint is kept"
                    ) from err
                raise RunError(
                    f"communication with another rank failed during step {self.step + 1} ({text.splitlines()[0][:160]}): "
                    "a rank died (see the other ranks' output); the last checkpoint is kept"
                ) from err
            raise

    def _run(self) -> RunResult:
        from nemo_gdro.trainer.metrics import open_logger

        cfg, c = self.cfg, self.components
        if not self.evaluates and self.is_main:
            warnings.warn(f"training without evaluation: {no_eval_suites(cfg)}", stacklevel=2)
        self._resume()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        logger = open_logger(
            self.output_dir, cfg.logging, main=self.is_main, resume_step=self.step if self.resumed else None,
            resume_log=self.state.resumed_log,
        )
        d = c.dist
        print(
            f"[nemo-gdro rank {d.rank}/{d.world_size}] dp {d.dp_rank}/{d.data_parallel} tp {d.tp_rank}/"
            f"{d.tensor_parallel} pp {d.pp_rank}/{d.pipeline_parallel} backend {d.backend}: {cfg.algorithm.describe()}",
            flush=True,
        )
        stop = StopSignals().install()
        try:
            if not self.progress.sft_done:
                stop.describe_now = lambda: "the warm start (no checkpoint exists before it ends; the next run starts over)"
                self._warm_start(logger)
            stop.deferrable = True
            stop.describe_now = lambda: f"step {self.step + 1}"
            self._rl_steps(logger, stop)
        except BaseException:
            c.close()  # no verification worker outlives a failed run, with or without close()
            raise
        finally:
            stop.restore()
            logger.close()
        return self._finish()

    def _rl_steps(self, logger, stop: StopSignals) -> None:
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
            if self.evaluates and ((last and self.cfg.eval.at_end) or (t.eval_every and step % t.eval_every == 0)):
                self.progress.last_eval = self._evaluate(step)
                logger.log_eval(step, self.progress.last_eval)
            saved = None
            if (last and self.cfg.checkpoint.at_end) or (t.checkpoint_every and step % t.checkpoint_every == 0):
                saved = self._save(logger)
            signum = stop.agreed()
            if signum is not None and not last:
                saved = saved or self._save(logger)
                if progress is not None:
                    progress.close()
                raise RunInterrupted(
                    f"stopped by {stop.name(signum)} after step {step}: checkpoint {saved}; run the same command "
                    "again to continue (run.resume=auto)",
                    signum,
                )
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
        why = {} if self.evaluates else {"none": "no eval suites"}
        print(f"[nemo-gdro] done: {self.step} RL steps. eval at start of RL: {_fmt(self.progress.sft_eval, **why)}",
              flush=True)
        label = f"eval at step {self.step}" if self.cfg.eval.at_end else "last eval"
        print(f"[nemo-gdro] {label}: {_fmt(self.progress.last_eval, **why)}", flush=True)
        print(f"[nemo-gdro] metrics: {out / 'metrics.jsonl'} (TensorBoard: {out})", flush=True)
        print(f"[nemo-gdro] plots:   {out / 'plots'} ({len(plots)} PNG); summary: {summary}", flush=True)
        return result

    # ----------------------------------------------------------------- lifetime
    def close(self) -> None:
        """Stop the verifiers' worker processes, tear down the process groups this trainer
        initialised, release the output directory."""
        try:
            tear_down(self.components)
        finally:
            if self.lock is not None:
                self.lock.release()

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _fmt(metrics: dict[str, float], none: str = "turned off: eval.at_start / eval.at_end / trainer.eval_every") -> str:
    """One line of held-out metrics; ``none``: why there are none."""
    if not metrics:
        return f"none ({none})"
    keys = [k for k in metrics if "/band_" not in k]
    return ", ".join(f"{k.split('/', 1)[1]} {metrics[k]:.3f}" for k in keys)


def train(overrides: list[str] | None = None, config_name: str = "train") -> RunResult:
    """Compose the config with ``overrides`` and run training."""
    from nemo_gdro.trainer.config import compose

    return train_config(compose(config_name, overrides))


def train_config(cfg: DictConfig | RunConfig) -> RunResult:
    """Run training on a composed (or already validated) config."""
    with Trainer(cfg) as trainer:
        return trainer.run()
