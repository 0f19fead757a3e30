"""Hugging Face checkpoints out: from the live actor (``checkpoint.save_hf``) and from a saved checkpoint (``nemo-gdro export``)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from nemo_gdro.models.hf_save import HFMetadata

__all__ = ["hf_metadata", "provenance", "export_live", "export_checkpoint", "HF_DTYPES"]

HF_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def hf_metadata(model_section: Any, tokenizer: Any, fallback: Path | None = None) -> HFMetadata:
    """Tokenizer files and generation config to write next to the weights.

    An HF tokenizer's directory is copied; with ``model.source=hf`` the
    source's ``generation_config.json`` is kept (Qwen3-Base: eos 151643 and
    151645); otherwise one is built from the tokenizer's stop ids.
    ``fallback``: a checkpoint's ``hf_assets`` copy of those files
    (:mod:`nemo_gdro.trainer.hf_assets`), used for each folder that is gone.
    """
    tokenizer_dir = getattr(tokenizer, "path", None)
    model_dir = getattr(model_section, "path", None)
    if fallback is not None and Path(fallback).is_dir():
        if tokenizer_dir is not None and not Path(tokenizer_dir).is_dir():
            tokenizer_dir = fallback
        if model_dir and not Path(model_dir).is_dir():
            model_dir = fallback
    generation = None
    if model_dir and (Path(model_dir) / "generation_config.json").is_file():
        generation = Path(model_dir) / "generation_config.json"
    stop = sorted(getattr(tokenizer, "stop_ids", {tokenizer.eos_id}))
    return HFMetadata(
        tokenizer_dir=tokenizer_dir,
        generation_config_source=generation,
        eos_token_id=stop if len(stop) > 1 else stop[0],
        pad_token_id=tokenizer.pad_id,
    )


def provenance(cfg: Any, source: Path, step: int | None) -> dict[str, Any]:
    """The export marker's content: where the weights come from and what they were trained with."""
    return {
        "format": "nemo_gdro.hf_export",
        "version": 1,
        "source": str(Path(source).resolve()),
        "step": step,
        "tokenizer": cfg.tokenizer.name,
        "task": cfg.data.task,
    }


def export_live(
    components: Any, out_dir: Path, dtype: str | None, step: int | None = None, assets: Path | None = None
) -> Path:
    """Write the actor's current weights as an HF directory (collective; rank 0 writes, atomically).

    ``assets``: the just written checkpoint's ``hf_assets`` (tokenizer files if the model folder is gone).
    """
    from nemo_gdro.models.hf_save import save_hf_checkpoint

    c = components
    return save_hf_checkpoint(
        c.actor.module, c.spec, out_dir, dtype=HF_DTYPES[dtype] if dtype else None,
        metadata=hf_metadata(c.cfg.model, c.tokenizer, assets),
        provenance=provenance(c.cfg, Path(c.cfg.run.output_dir), step),
    )


def rotate(root: Path, keep: int) -> None:
    """Keep the ``keep`` newest ``step_*`` HF exports under ``root``."""
    dirs = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in dirs[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def export_checkpoint(checkpoint: Path, out_dir: Path, dtype: str | None = None, overwrite: bool = False) -> Path:
    """Convert a saved training checkpoint (a run dir or one ``step_XXXXXXXX`` dir) to an HF directory.

    Needs no Megatron and no process group: the saved model shards (one per
    TP x PP position) are merged offline with the spec rebuilt from the
    checkpoint's own ``config.yaml``. ``out_dir`` is checked first
    (:func:`~nemo_gdro.trainer.export_target.check_export_target`: never a run
    directory, the checkpoint or its sources; an existing HF checkpoint only with
    ``overwrite``), then written to a temp sibling and renamed into place.
    """
    from omegaconf import OmegaConf

    from nemo_gdro.models.hf_save import write_hf_dir
    from nemo_gdro.models.megatron_shards import hf_state_dict_from_megatron_shards
    from nemo_gdro.registries import MODEL_SOURCES, TOKENIZERS
    from nemo_gdro.trainer.checkpoint import CONFIG_NAME, CheckpointError, CheckpointManager
    from nemo_gdro.trainer.config import validate
    from nemo_gdro.trainer.export_target import check_export_target
    from nemo_gdro.trainer.hf_assets import with_assets

    checkpoint = Path(checkpoint)
    step_dir = checkpoint
    if (checkpoint / "checkpoints").is_dir():
        latest = CheckpointManager(checkpoint / "checkpoints").latest()
        if latest is None:
            raise CheckpointError(f"{checkpoint}: no complete checkpoint under {checkpoint / 'checkpoints'}")
        step_dir = latest
    config_path = step_dir / CONFIG_NAME
    if not config_path.is_file():
        raise CheckpointError(f"{step_dir}: no {CONFIG_NAME} (is this a nemo_gdro checkpoint directory?)")
    # The model folder may be gone: its tokenizer and config files are kept with the checkpoint.
    cfg = validate(with_assets(OmegaConf.load(config_path), step_dir))
    sources = [("model.path", getattr(cfg.model, "path", None)), ("tokenizer.path", cfg.tokenizer.path)]
    out_dir = check_export_target(out_dir, checkpoint=step_dir, sources=sources, overwrite=overwrite)
    tokenizer = TOKENIZERS.get(cfg.tokenizer.name)(cfg.tokenizer, cfg.model)
    spec = MODEL_SOURCES.get(cfg.model.source).build(cfg.model, tokenizer).spec
    state = CheckpointManager(step_dir.parent).load(step_dir)
    actor = state["actor"]
    if isinstance(actor, list):  # TP/PP: one slice per rank (DP peers hold copies)
        seen, shards = set(), []
        for layout, part in zip(state["layout"], actor):
            key = (layout["tp_rank"], layout["pp_rank"])
            if key not in seen:
                seen.add(key)
                shards.append((layout, part["model"]))
    else:
        shards = [({"tp": 1, "pp": 1, "tp_rank": 0, "pp_rank": 0}, actor["model"])]
    hf = hf_state_dict_from_megatron_shards(spec, shards)
    stored = HF_DTYPES[dtype] if dtype else cfg.model.torch_dtype
    step = int(state["trainer"]["step"]) if isinstance(state.get("trainer"), dict) else None
    return write_hf_dir(
        out_dir, hf.items(), spec, dtype=stored, metadata=hf_metadata(cfg.model, tokenizer),
        provenance=provenance(cfg, step_dir, step),
    )
