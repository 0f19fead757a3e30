"""``nemo-gdro eval <checkpoint | run dir | HF dir>``: the task's eval suites without training.

An HF checkpoint directory (``config.json`` + safetensors) is evaluated with
``model=hf model.path=<dir>`` on top of the given config; a training run
directory or one ``checkpoints/step_XXXXXXXX`` directory is evaluated with the
config saved in the checkpoint (plus the given overrides, e.g. ``eval.k=8``)
and its actor weights. Prints one row per suite (mean@k, pass@1, pass@k) and
the pooled row; ``--out FILE`` also writes them as JSON.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["evaluate_target", "format_table"]


def _checkpoint_dir(target: Path) -> Path | None:
    from nemo_gdro.trainer.checkpoint import CheckpointManager

    if (target / "manifest.json").is_file():
        return target
    if (target / "checkpoints").is_dir():
        return CheckpointManager(target / "checkpoints").latest()
    return None


def _config_for(target: Path, overrides: list[str], config_name: str) -> tuple[Any, Path | None]:
    """The typed run config to evaluate with, and the checkpoint dir to load (None for an HF dir)."""
    from omegaconf import OmegaConf

    from nemo_gdro.trainer.checkpoint import CONFIG_NAME
    from nemo_gdro.trainer.config import compose, validate
    from nemo_gdro.trainer.hf_assets import with_assets
    from nemo_gdro.typed_config import ConfigError

    if not target.exists():
        raise ConfigError(f"nothing to evaluate at {target}")
    ckpt = _checkpoint_dir(target)
    if ckpt is not None:
        # The model folder may be gone: its tokenizer and config files are kept with the checkpoint.
        tree = with_assets(OmegaConf.load(ckpt / CONFIG_NAME), ckpt)
        # key=value overrides on the saved config (values parsed as YAML, like Hydra's).
        tree = OmegaConf.merge(tree, OmegaConf.from_dotlist([item.lstrip("+") for item in overrides]))
        return validate(tree), ckpt
    if (target / "config.json").is_file():
        return validate(compose(config_name, ["model=hf", f"model.path={target}", "sft.steps=0", *overrides])), None
    raise ConfigError(
        f"{target} is neither a training run / checkpoint directory (manifest.json, checkpoints/) "
        "nor a Hugging Face checkpoint (config.json)"
    )


def evaluate_target(target: str | Path, overrides: list[str] | None = None, config_name: str = "train") -> dict[str, float]:
    """Evaluate ``target`` on the task's eval suites; returns the ``eval/*`` metrics."""
    from nemo_gdro.trainer.loop import Trainer
    from nemo_gdro.trainer.phases import evaluate

    cfg, ckpt = _config_for(Path(target), list(overrides or []), config_name)
    with Trainer(cfg) as trainer:
        if ckpt is not None:
            trainer.state.load(ckpt, trainer._enter_rl_phase)
        step = trainer.step
        return evaluate(trainer.components, step, cfg.eval.k, cfg.seed)


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
