"""Checks that need more than the config alone, made before anything heavy is built.

Each raises :class:`~nemo_gdro.typed_config.ConfigError` naming the key and the
allowed values, instead of a Megatron assertion or a shape error minutes later.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nemo_gdro.typed_config import ConfigError

__all__ = ["check_launch", "check_world_size", "check_model_layout", "check_token_budget"]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_world_size(parallel: Any, world_size: int) -> None:
    """``tensor_parallel * pipeline_parallel`` must divide the number of processes launched."""
    tp, pp = parallel.tensor_parallel, parallel.pipeline_parallel
    if world_size % (tp * pp):
        raise ConfigError(
            f"parallel.tensor_parallel * parallel.pipeline_parallel = {tp} * {pp} = {tp * pp} must divide the "
            f"{world_size} process(es) launched (allowed products: {_divisors(world_size)}); launch more processes "
            "(torchrun --nproc_per_node, srun --ntasks) or lower them"
        )


def check_launch(cfg: Any, world_size: int | None = None) -> None:
    """What the command line can check about this launch before importing torch: the
    world size against the parallel layout, an explicit ``run.resume`` path and the input
    files (:func:`~nemo_gdro.trainer.input_check.check_inputs`: the data files and the HF
    checkpoint / tokenizer directories, every problem in one line).

    ``world_size``: the number of processes the job will start (a batch script checking
    before ``srun`` passes the job's task count); default: this process's launcher's.
    The trainer repeats the layout and HF checks (library callers do not come through the CLI).
    """
    from nemo_gdro.parallel.launch import detect_launch_env
    from nemo_gdro.trainer.input_check import check_inputs

    check_world_size(cfg.parallel, detect_launch_env().world_size if world_size is None else world_size)
    resume = cfg.run.resume
    if resume is not None and resume.strip().lower() not in ("auto", "none", "null", ""):
        if not Path(resume).expanduser().exists():
            raise ConfigError(
                f"run.resume={resume!r}: no such checkpoint directory (allowed: auto, null, or a "
                "checkpoints/step_XXXXXXXX directory)"
            )
    check_inputs(cfg)


def check_model_layout(spec: Any, parallel: Any) -> None:
    """The model's shapes split over the Megatron layout (what the actor would otherwise assert)."""
    tp, pp = parallel.tensor_parallel, parallel.pipeline_parallel
    for name, value in (("vocab_size", spec.vocab_size), ("num_query_groups", spec.num_query_groups)):
        if value % tp:
            raise ConfigError(
                f"parallel.tensor_parallel={tp} must divide model {name}={value} (allowed: {_divisors(value)[:12]})"
            )
    if spec.num_layers % pp:
        raise ConfigError(
            f"parallel.pipeline_parallel={pp} must divide model num_layers={spec.num_layers} "
            f"(allowed: {_divisors(spec.num_layers)})"
        )


def _budget_error(budget: int, what: str, need: int) -> ConfigError:
    return ConfigError(
        f"trainer.max_tokens_per_microbatch={budget} is below the longest possible row: {what} = {need} tokens "
        f"(no micro-batch could hold it); set trainer.max_tokens_per_microbatch >= {need}, or null"
    )


def check_token_budget(cfg: Any, task: Any, tokenizer: Any) -> None:
    """``trainer.max_tokens_per_microbatch`` holds the longest row a step can make, checked once the
    data is tokenizable (before any step; the config-only bound, 1 + ``rollout.max_new_tokens``,
    is checked when the config is loaded).

    RL rows are a training prompt + up to ``rollout.max_new_tokens`` response tokens; SFT rows
    (``sft.steps > 0``) a prompt + its worked answer. With ``data.max_prompt_tokens`` bounding
    the prompts below the budget, nothing is tokenized here.
    """
    budget = cfg.trainer.max_tokens_per_microbatch
    if budget is None:
        return
    from nemo_gdro.data.prompt_files import token_lengths

    new = cfg.rollout.max_new_tokens
    bound = getattr(cfg.data, "max_prompt_tokens", None)
    if bound is None or bound + new > budget:
        records = list(task.train)
        lengths = token_lengths(tokenizer, [r.prompt for r in records])
        longest = max(range(len(lengths)), key=lengths.__getitem__)
        if lengths[longest] + new > budget:
            raise _budget_error(
                budget, f"the longest training prompt (id {records[longest].prompt_id}, {lengths[longest]} tokens) + "
                f"rollout.max_new_tokens={new}", lengths[longest] + new,
            )
    if cfg.sft.steps > 0 and task.sft is not None:
        rows = [len(tokenizer.encode_prompt(r.prompt)) + len(tokenizer.encode_target(r.meta["sft_target"]))
                for r in task.sft]
        if rows and max(rows) > budget:
            raise _budget_error(budget, "the longest SFT row (prompt + worked answer, sft.steps > 0)", max(rows))
