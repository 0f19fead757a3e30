"""``nemo-gdro eval <checkpoint | run dir | HF dir>``: the task's eval suites without training.

An HF checkpoint directory (``config.json`` + safetensors) is evaluated with
``model=hf model.path=<dir>`` on top of the given config, with its own
tokenizer and a task it fits (see :func:`_hf_config`); a training run
directory or one ``checkpoints/step_XXXXXXXX`` directory is evaluated with the
config saved in the checkpoint (upgraded to today's keys if it predates some:
:mod:`nemo_gdro.trainer.config_upgrade`; plus the given overrides, e.g. ``eval.k=8``)
and its actor weights (the newest complete checkpoint, read without the
run's lock: the run may still be training). Nothing is written but ``--out``.
Prints one row per suite (mean@k, pass@1, pass@k) and the pooled row;
``--out FILE`` also writes them as JSON.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Callable, Iterator

__all__ = ["evaluate_target", "format_table"]


#: The keys that choose a task for an HF model, per task (named in refusals).
_TASK_KEYS = {
    "math": "data=math data.train_files=[FILE] +data.eval_files.<benchmark>=[FILE] reward.verifier=dapo_math",
    "arithmetic": "data=arithmetic",
}


def _key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0].strip()


def _checkpoint_dir(target: Path) -> Path | None:
    """The step directory to evaluate: ``target`` itself, or the newest complete, manifest-verified one of a run."""
    from nemo_gdro.trainer.checkpoint import CheckpointManager
    from nemo_gdro.typed_config import ConfigError

    if (target / "manifest.json").is_file():
        return target
    if (target / "checkpoints").is_dir():
        latest = CheckpointManager(target / "checkpoints").latest()
        if latest is None:
            raise ConfigError(
                f"{target} holds no complete checkpoint yet under {target / 'checkpoints'} (a run writes its first "
                "after the warm start): evaluate it later, or give one checkpoints/step_XXXXXXXX directory"
            )
        return latest
    return None


def _hf_config(target: Path, overrides: list[str], config_name: str) -> Any:
    """The config for an HF directory: its own tokenizer, and a task it was trained on or the user chose.

    The tokenizer: ``tokenizer.name`` when given; else the one recorded by our
    export (``nemo_gdro_export.json``); else the directory's HF tokenizer. The
    task: ``data`` / ``data.task`` when given; else it must be the one recorded
    by our export, and an HF model without that record is never scored on the
    default arithmetic task (its prompts are written for the character tokenizer).
    """
    from nemo_gdro.models.hf_export_marker import TOKENIZER_FILES, read_marker
    from nemo_gdro.trainer.config import compose, validate
    from nemo_gdro.typed_config import ConfigError

    # Evaluation draws no training prompts: a training pool smaller than a step's prompts is fine.
    base = ["model=hf", f"model.path={target}", "sft.steps=0", "trainer.prompts_per_step=1",
            "trainer.minibatches_per_step=1"]
    keys = {_key(item) for item in overrides}
    marker = read_marker(target) or {}
    extra: list[str] = []
    if "tokenizer.name" not in keys:
        chosen = marker.get("tokenizer")
        if chosen is None:
            if "tokenizer.path" not in keys and not any((target / name).is_file() for name in TOKENIZER_FILES):
                raise ConfigError(
                    f"{target} holds no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...): give "
                    "tokenizer.name=hf tokenizer.path=<directory with the model's tokenizer>, or tokenizer.name=char "
                    "for a model trained with the character tokenizer"
                )
            chosen = "hf"
        extra.append(f"tokenizer.name={chosen}")
    tree = compose(config_name, [*base, *extra, *overrides])
    task, tokenizer = tree.data.task, tree.tokenizer.name
    if not keys & {"data", "data.task"}:
        trained = marker.get("task")
        if trained is not None and trained != task:
            raise ConfigError(
                f"{target} was trained on data.task={trained} but the config evaluates data.task={task}: give the "
                f"task's keys, e.g. {_TASK_KEYS.get(trained, f'data={trained}')}"
            )
        if trained is None and task == "arithmetic" and tokenizer != "char":
            raise ConfigError(
                f"{target} is a Hugging Face model with its own tokenizer; the default task, data=arithmetic, is "
                "written for the character tokenizer and would say nothing about it: give a task, e.g. "
                f"{_TASK_KEYS['math']} (or data=arithmetic to score the arithmetic task anyway)"
            )
    return validate(tree)


def _config_for(
    target: Path, overrides: list[str], config_name: str, log: Callable[[str], Any] = print
) -> tuple[Any, Path | None]:
    """The typed run config to evaluate with, and the checkpoint dir to load (None for an HF dir).

    A checkpoint's saved config written before keys were renamed or added is upgraded
    (:func:`~nemo_gdro.trainer.config_upgrade.upgrade_saved_config`), with one ``log`` line naming them.
    """
    from omegaconf import OmegaConf

    from nemo_gdro.trainer.checkpoint import CONFIG_NAME
    from nemo_gdro.trainer.config import validate
    from nemo_gdro.trainer.config_upgrade import describe, upgrade_saved_config, upgraded_keys
    from nemo_gdro.trainer.hf_assets import with_assets
    from nemo_gdro.typed_config import ConfigError

    if not target.exists():
        raise ConfigError(f"nothing to evaluate at {target}")
    ckpt = _checkpoint_dir(target)
    if ckpt is not None:
        # The model folder may be gone: its tokenizer and config files are kept with the checkpoint.
        tree = with_assets(OmegaConf.load(ckpt / CONFIG_NAME), ckpt)
        # A checkpoint written before keys were renamed or added is read with today's keys.
        tree, notes = upgrade_saved_config(tree)
        # key=value overrides on the saved config (values parsed as YAML, like Hydra's).
        tree = OmegaConf.merge(tree, OmegaConf.from_dotlist([item.lstrip("+") for item in overrides]))
        if notes:
            log(describe(notes, str(ckpt)))
            # The restore compares this config with the saved one (RunState.check): these keys were
            # renamed or absent, not changed by the user.
            tree.run.allow_config_change = [*(tree.run.get("allow_config_change") or []), *upgraded_keys(notes)]
        cfg = validate(tree)
    elif (target / "config.json").is_file():
        cfg = _hf_config(target, overrides, config_name)
    else:
        raise ConfigError(
            f"{target} is neither a training run / checkpoint directory (manifest.json, checkpoints/) "
            "nor a Hugging Face checkpoint (config.json)"
        )
    if getattr(cfg.data, "eval_files", None) == {}:
        from nemo_gdro.trainer.phases import no_eval_suites

        raise ConfigError(f"nothing to evaluate: {no_eval_suites(cfg)}")
    return cfg, ckpt


@contextlib.contextmanager
def _components(cfg: Any) -> Iterator[Any]:
    """The run's components for ``cfg``, torn down on exit. No run directory is locked or written:
    evaluation only reads, so a run that is still training keeps its lock and its files."""
    from nemo_gdro.parallel.launch import detect_launch_env
    from nemo_gdro.trainer.components import build_components, tear_down
    from nemo_gdro.trainer.preflight import check_world_size

    check_world_size(cfg.parallel, detect_launch_env().world_size)
    components = None
    try:
        components = build_components(cfg)
        yield components
    finally:
        tear_down(components)


def _load(components: Any, ckpt: Path) -> int:
    """Restore ``ckpt`` into ``components`` (verified against its manifest); returns its step."""
    from nemo_gdro.trainer.errors import CheckpointError
    from nemo_gdro.trainer.run_state import RunState, TrainerState

    progress = TrainerState()
    try:
        # The checkpoint's optimizer state is the RL phase's.
        RunState(components, progress, ckpt.parent.parent).load(ckpt, components.enter_rl_phase)
    except FileNotFoundError as err:  # a live run rotated it away while it was read
        raise CheckpointError(f"{ckpt}: a file disappeared while it was read ({err.filename}): run eval again") from None
    return progress.step


def evaluate_target(target: str | Path, overrides: list[str] | None = None, config_name: str = "train") -> dict[str, float]:
    """Evaluate ``target`` on the task's eval suites; returns the ``eval/*`` metrics.

    Nothing is written: not into a run directory (which may still be
    training: its lock is not taken), nor into ``run.output_dir``.
    """
    from nemo_gdro.trainer.phases import evaluate

    cfg, ckpt = _config_for(Path(target), list(overrides or []), config_name)
    with _components(cfg) as components:
        step = _load(components, ckpt) if ckpt is not None else 0
        return evaluate(components, step, cfg.eval.k, cfg.seed)


def format_table(metrics: dict[str, float], k: int) -> str:
    """One row per suite and the pooled row: mean@k, pass@1, pass@k."""
    suites = sorted({key.split("/")[1] for key in metrics if key.count("/") == 2 and key.endswith("mean@k")})
    rows = [("suite", "mean@k", "pass@1", f"pass@{k}")]
    for name in suites:
        p = f"eval/{name}/"
        rows.append((name, f"{metrics[p + 'mean@k']:.4f}", f"{metrics[p + 'mean@k']:.4f}", f"{metrics[p + f'pass@{k}']:.4f}"))
    rows.append(("pooled", f"{metrics['eval/mean@k']:.4f}", f"{metrics['eval/pass@1']:.4f}", f"{metrics[f'eval/pass@{k}']:.4f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


def write_json(path: str | Path, metrics: dict[str, float]) -> None:
    Path(path).write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
