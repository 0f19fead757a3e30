"""Training configuration: Hydra composition with NeMo-style overrides, then typed validation.

The YAML under ``nemo_gdro/conf/`` is composed with Hydra's compose API, so
command-line overrides follow NeMo/Hydra rules: ``key=value`` changes an
existing key (an unknown key is an error), ``+key=value`` adds one,
``++key=value`` adds or replaces, ``group=option`` swaps a config group (e.g.
``data=arithmetic``). :func:`validate` then builds the typed
:class:`~nemo_gdro.trainer.run_config.RunConfig`, before anything is built: a
bad run fails in the first second, naming the key.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from nemo_gdro.stages.setup import RETIRED_KEYS
from nemo_gdro.trainer.run_config import RunConfig, build_run_config
from nemo_gdro.typed_config import ConfigError

__all__ = ["CONF_DIR", "ConfigError", "compose", "validate", "load"]

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def _check_retired(overrides: list[str]) -> None:
    for item in overrides:
        key = item.lstrip("+~").split("=", 1)[0].strip()
        if key in RETIRED_KEYS:
            raise ConfigError(f"{key} was removed: {RETIRED_KEYS[key]}")


def compose(config_name: str = "train", overrides: list[str] | None = None) -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with NeMo/Hydra-style overrides (resolved)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    overrides = list(overrides or [])
    _check_retired(overrides)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            cfg = hydra_compose(config_name=config_name, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(f"config override rejected: {err}") from None
    finally:
        GlobalHydra.instance().clear()
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as err:
        raise ConfigError(f"config interpolation failed: {err}") from None
    return cfg


def validate(cfg: DictConfig) -> RunConfig:
    """All start-up checks; returns the typed run configuration."""
    return build_run_config(cfg)


def load(config_name: str = "train", overrides: list[str] | None = None) -> RunConfig:
    """:func:`compose` then :func:`validate`."""
    return validate(compose(config_name, overrides))
