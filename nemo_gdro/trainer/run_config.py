"""The whole run configuration, typed: one frozen dataclass per section of ``conf/train.yaml``.

:func:`build_run_config` turns the composed Hydra tree into a
:class:`RunConfig`. Every section rejects unknown keys (so ``+rollout.temprature=0.5``
is an error, not a silently ignored key), checks each value's type (no
booleans as numbers, no strings as numbers) and range, and names the key
with the allowed values. Cross-section rules (a mini-batch per optimizer
step must not be empty, a component named in one section must exist) follow.
The loop reads typed fields only.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from omegaconf import DictConfig, OmegaConf

from nemo_gdro.models.megatron_options import MegatronOptions, check_environment
from nemo_gdro.stages.setup import AlgorithmSetup
from nemo_gdro.typed_config import ConfigError, build_section

__all__ = [
    "RunSection",
    "ParallelSection",
    "ModelSection",
    "MegatronSection",
    "TokenizerSection",
    "SFTSection",
    "TrainerSection",
    "OptimSection",
    "RolloutSection",
    "EvalSection",
    "RewardSection",
    "CheckpointSection",
    "LoggingSection",
    "RunConfig",
    "build_run_config",
]


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass(frozen=True)
class RunSection:
    """``run``: identity, output directory, seed and resume policy.

    resume: ``null`` (fresh run; an output dir holding checkpoints is an
        error), ``auto`` (newest complete checkpoint, if any) or a checkpoint path.
    allow_config_change: keys (or key prefixes, ``data`` for the training
        data, ``*`` for all) whose change against the resumed checkpoint's
        config is deliberate (:mod:`nemo_gdro.trainer.resume_check`).
    """

    name: str
    output_dir: str
    seed: int = 0
    resume: str | None = "auto"
    allow_config_change: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _require(bool(self.name.strip()), "run.name must be a non-empty string")
        _require(bool(self.output_dir.strip()), "run.output_dir must be a non-empty path")
        _require(0 <= self.seed < 2**31, f"run.seed must be an integer in [0, 2**31), got {self.seed}")
        _require(self.resume is None or bool(self.resume.strip()), "run.resume must be null, 'auto' or a checkpoint path")


@dataclass(frozen=True)
class ParallelSection:
    """``parallel``: Megatron layout; data parallel = world size / (tensor_parallel * pipeline_parallel).

    timeout_s: collective timeout in seconds: a rank that stalls or dies fails the job after this long.
    """

    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    timeout_s: float = 1800.0

    def __post_init__(self) -> None:
        for key in ("tensor_parallel", "pipeline_parallel"):
            _require(getattr(self, key) >= 1, f"parallel.{key} must be an integer >= 1, got {getattr(self, key)}")
        _require(0 < self.timeout_s < float("inf"), f"parallel.timeout_s must be a finite number > 0, got {self.timeout_s}")


@dataclass(frozen=True)
class ModelSection:
    """``model`` (config group ``model=tiny|hf``): where the policy comes from and its parameter dtype.

    source: a ``model.source`` registry name: ``preset`` (random init of a
        :data:`~nemo_gdro.models.gpt.PRESETS` entry with ``overrides``) or
        ``hf`` (architecture from ``path/config.json``, weights from its safetensors).
    dtype: parameter dtype of the actor: ``bfloat16`` (fp32 gradients and master
        weights; on CPU too, through :mod:`nemo_gdro.parallel.megatron_compat`),
        ``float32``, or ``auto`` (bfloat16 with CUDA, float32 without).
    """

    source: str = "preset"
    preset: str = "tiny"
    overrides: dict[str, Any] = field(default_factory=dict)
    path: str | None = None
    dtype: Literal["auto", "float32", "bfloat16"] = "float32"

    def __post_init__(self) -> None:
        from nemo_gdro.models.spec import PRESETS
        from nemo_gdro.registries import MODEL_SOURCES

        MODEL_SOURCES.check(self.source)
        if self.source == "preset":
            _require(self.preset in PRESETS, f"model.preset must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        if self.source == "hf":
            _require(bool(self.path), "model.source=hf needs model.path (a Hugging Face checkpoint directory)")
            _require(not self.overrides, "model.overrides apply to model.source=preset only; the architecture of "
                     "model.source=hf comes from model.path/config.json")

    @property
    def resolved_dtype(self) -> Literal["float32", "bfloat16"]:
        """``dtype`` with ``auto`` resolved on this host."""
        if self.dtype != "auto":
            return self.dtype
        import torch

        return "bfloat16" if torch.cuda.is_available() else "float32"

    @property
    def torch_dtype(self) -> Any:
        import torch

        return {"float32": torch.float32, "bfloat16": torch.bfloat16}[self.resolved_dtype]


#: ``megatron``: layer implementation (local / Transformer Engine), FP8, recompute, sequence
#: parallelism, distributed optimizer, optimizer offload during generation. Keys, defaults and
#: the rules of their combinations: :class:`~nemo_gdro.models.megatron_options.MegatronOptions`;
#: the rules that involve other sections and the host are checked with the whole config.
MegatronSection = MegatronOptions


@dataclass(frozen=True)
class TokenizerSection:
    """``tokenizer``: a ``tokenizer.name`` registry name: ``char`` (the fixed character
    vocabulary) or ``hf`` (the tokenizer of ``path``, default ``model.path``)."""

    name: str = "char"
    path: str | None = None

    def __post_init__(self) -> None:
        from nemo_gdro.registries import TOKENIZERS

        TOKENIZERS.check(self.name)


@dataclass(frozen=True)
class SFTSection:
    """``sft``: the optional next-token warm start before RL (``steps: 0`` skips it)."""

    steps: int = 0
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        _require(self.steps >= 0, f"sft.steps must be an integer >= 0 (0 disables), got {self.steps}")
        _require(self.batch_size >= 1, f"sft.batch_size must be a positive integer, got {self.batch_size}")
        _require(0 < self.lr < float("inf"), f"sft.lr must be a finite number > 0, got {self.lr}")
        _require(self.weight_decay >= 0, f"sft.weight_decay must be >= 0, got {self.weight_decay}")
        _require(self.warmup_steps >= 0, f"sft.warmup_steps must be >= 0, got {self.warmup_steps}")


@dataclass(frozen=True)
class TrainerSection:
    """``trainer``: the RL schedule. ``eval_every`` / ``checkpoint_every`` 0 disable the periodic evaluations /
    checkpoints; the ones at the start of RL and after the last step are ``eval.at_start`` / ``eval.at_end`` and
    ``checkpoint.at_start`` / ``checkpoint.at_end`` (all on by default).

    max_tokens_per_microbatch: when set, rows are packed by length into micro-batches of at
    most this many tokens (rows x longest row) for the training and log-prob passes, instead
    of ``micro_batch_size`` rows; the results are the same (the loss is globally normalised).
    epochs_per_batch: passes over each rollout batch (PPO epochs, >= 1); each pass reshuffles the
        rows into ``minibatches_per_step`` mini-batches, one optimizer step each, so an RL step takes
        ``epochs_per_batch * minibatches_per_step`` optimizer steps.
    on_nonfinite: a non-finite loss or gradient ``stop``s the run naming the
        step, or ``skip``s that optimizer step (counted in ``guard/*``
        metrics; after ``max_consecutive_skips`` in a row the run stops too).
    """

    max_steps: int
    prompts_per_step: int
    minibatches_per_step: int = 1
    epochs_per_batch: int = 1
    micro_batch_size: int = 4
    eval_every: int = 0
    checkpoint_every: int = 0
    keep_last_checkpoints: int = 2
    max_tokens_per_microbatch: int | None = None
    on_nonfinite: Literal["stop", "skip"] = "stop"
    max_consecutive_skips: int = 5

    def __post_init__(self) -> None:
        _require(
            self.max_tokens_per_microbatch is None or self.max_tokens_per_microbatch >= 2,
            f"trainer.max_tokens_per_microbatch must be an integer >= 2 (tokens per forward/backward, padding "
            f"counted) or null (micro_batch_size rows), got {self.max_tokens_per_microbatch}",
        )
        for key in ("max_steps", "prompts_per_step", "minibatches_per_step", "epochs_per_batch", "micro_batch_size",
                    "keep_last_checkpoints", "max_consecutive_skips"):
            _require(getattr(self, key) >= 1, f"trainer.{key} must be a positive integer, got {getattr(self, key)}")
        for key in ("eval_every", "checkpoint_every"):
            _require(getattr(self, key) >= 0, f"trainer.{key} must be an integer >= 0 (0 disables), got {getattr(self, key)}")
        _require(
            self.prompts_per_step >= self.minibatches_per_step,
            f"trainer.minibatches_per_step ({self.minibatches_per_step}) exceeds trainer.prompts_per_step "
            f"({self.prompts_per_step}): a mini-batch would be empty",
        )


@dataclass(frozen=True)
class OptimSection:
    """``optim``: AdamW for the RL phase (linear warm-up, global-norm clipping; ``grad_clip: 0`` disables)."""

    lr: float = 1e-6
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 1.0
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        _require(0 < self.lr < float("inf"), f"optim.lr must be a finite number > 0, got {self.lr}")
        _require(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        _require(all(0 <= b < 1 for b in self.betas), f"optim.betas must be two numbers in [0, 1), got {list(self.betas)}")
        _require(self.eps > 0, f"optim.eps must be > 0, got {self.eps}")
        _require(self.grad_clip >= 0, f"optim.grad_clip must be >= 0 (0 disables), got {self.grad_clip}")
        _require(self.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")


def _check_sampling(section: str, temperature: float, top_p: float, top_k: int) -> None:
    _require(0 < temperature < float("inf"), f"{section}.temperature must be a finite number > 0, got {temperature}")
    _require(0 < top_p <= 1, f"{section}.top_p must be in (0, 1], got {top_p}")
    _require(top_k >= 0, f"{section}.top_k must be an integer >= 0 (0 disables), got {top_k}")


@dataclass(frozen=True)
class RolloutSection:
    """``rollout``: the engine (``rollout.engine`` registry name) and training-time sampling.

    n: mean rollouts per prompt ``n_bar`` (the step's budget is ``P * n``).
    max_new_tokens: response length cap in tokens.
    tis_cap: truncated importance sampling for the engine-vs-actor mismatch
        (FP8 / low-precision rollouts): each token's loss is scaled by
        ``min(exp(logp_actor_old - logp_engine), tis_cap)``; ``null`` disables.
    vllm: ``rollout.engine=vllm`` options (:class:`~nemo_gdro.rollout.vllm_options.VLLMOptions`).
    """

    engine: str = "hf"
    n: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 16
    tis_cap: float | None = None
    vllm: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from nemo_gdro.registries import ROLLOUT_ENGINES
        from nemo_gdro.rollout.vllm_options import VLLMOptions

        ROLLOUT_ENGINES.check(self.engine)
        _require(self.n >= 1, f"rollout.n must be a positive integer, got {self.n}")
        _require(self.max_new_tokens >= 1, f"rollout.max_new_tokens must be a positive integer, got {self.max_new_tokens}")
        _require(self.tis_cap is None or self.tis_cap > 0, f"rollout.tis_cap must be > 0 or null, got {self.tis_cap}")
        _check_sampling("rollout", self.temperature, self.top_p, self.top_k)
        options = build_section(VLLMOptions, "rollout.vllm", self.vllm)
        object.__setattr__(self, "vllm_options", options)
        if self.engine == "vllm" and importlib.util.find_spec("vllm") is None:
            raise ConfigError(
                "rollout.engine=vllm needs vLLM: pip install 'nemo_gdro[vllm]' on GPU hosts (on CPU: make setup-vllm "
                "and use .venv-vllm)"
            )


@dataclass(frozen=True)
class EvalSection:
    """``eval``: ``k`` samples per held-out problem (mean@k, unbiased pass@1 / pass@k) at these sampling settings.

    at_start: evaluate when RL starts (and, with an SFT warm start, before it too).
    at_end: evaluate after the last step (besides every ``trainer.eval_every`` steps).
    With both false and ``trainer.eval_every: 0`` a run never evaluates.
    """

    k: int = 4
    temperature: float = 0.6
    top_p: float = 1.0
    top_k: int = 0
    at_start: bool = True
    at_end: bool = True

    def __post_init__(self) -> None:
        _require(self.k >= 1, f"eval.k must be a positive integer, got {self.k}")
        _check_sampling("eval", self.temperature, self.top_p, self.top_k)


@dataclass(frozen=True)
class RewardSection:
    """``reward``: how a response becomes a correctness verdict and a reward.

    verifier: ``reward.verifier`` registry name (``arithmetic`` | ``dapo_math`` |
        ``math_verify`` | ``gpqa_choice``) for the task's free-form answers;
        ``choice_verifier`` scores multiple-choice suites (GPQA-Diamond).
    correct_reward / wrong_reward: reward values (1/0; DAPO uses 1/-1).
    num_workers / timeout_s / soft_timeout_fraction / max_tasks_per_worker /
        max_memory_mb / start_timeout_s / warmup: the worker pool
        (:class:`~nemo_gdro.rewards.registry.RewardConfig`); verifiers that decide
        every row by string work (``arithmetic``, ``gpqa_choice``) start no processes.
    options: the verifier's own options (``reward.options.extract``, ...).
    overlong: DAPO soft overlong punishment before ``rollout.max_new_tokens``
        (:class:`~nemo_gdro.rewards.shaping.OverlongConfig`: ``enabled``,
        ``buffer_tokens``, ``penalty``); shapes the advantages' rewards only,
        never the correctness that feeds pass rates and difficulty bins.
    mask_truncated: responses that hit ``rollout.max_new_tokens`` without a stop
        token get no loss (DAPO's overlong filtering).
    """

    verifier: str = "arithmetic"
    correct_reward: float = 1.0
    wrong_reward: float = 0.0
    num_workers: int = 2
    timeout_s: float = 5.0
    soft_timeout_fraction: float = 0.8
    max_tasks_per_worker: int = 0
    max_memory_mb: int = 4096
    start_timeout_s: float = 120.0
    warmup: bool = True
    options: dict[str, Any] = field(default_factory=dict)
    choice_verifier: str = "gpqa_choice"
    overlong: dict[str, Any] = field(default_factory=dict)
    mask_truncated: bool = False

    def __post_init__(self) -> None:
        from nemo_gdro.rewards.registry import RewardConfig
        from nemo_gdro.rewards.overlong import OverlongConfig

        # The pool's own keys, passed through by name (RewardConfig validates them).
        pool_keys = {f.name: getattr(self, f.name) for f in dataclasses.fields(RewardConfig)}
        verifier_config = RewardConfig(**{**pool_keys, "options": dict(self.options)})
        from nemo_gdro.rewards.registry import VERIFIERS

        _require(
            self.choice_verifier in VERIFIERS,
            f"reward.choice_verifier: unknown verifier {self.choice_verifier!r}; registered: {sorted(VERIFIERS)}",
        )
        object.__setattr__(self, "verifier_config", verifier_config)
        object.__setattr__(self, "overlong_config", build_section(OverlongConfig, "reward.overlong", self.overlong))


@dataclass(frozen=True)
class CheckpointSection:
    """``checkpoint``: Hugging Face exports next to the training checkpoints.

    save_hf: at every checkpoint (and the last step) also write
        ``<output_dir>/hf/step_XXXXXXXX`` (sharded safetensors, config,
        generation config, tokenizer files), rotated like the checkpoints.
    hf_dtype: stored dtype (``null``: the actor's parameter dtype).
    at_start: write a checkpoint when RL starts (after the SFT warm start, so a resumed run skips it).
    at_end: write one after the last step (besides every ``trainer.checkpoint_every`` steps).
        With both false and ``trainer.checkpoint_every: 0`` a run writes no checkpoint, except
        when SIGTERM / SIGINT stops it early (so that it can be resumed).
    """

    save_hf: bool = False
    hf_dtype: Literal["float32", "bfloat16"] | None = None
    at_start: bool = True
    at_end: bool = True


@dataclass(frozen=True)
class LoggingSection:
    """``logging``: TensorBoard, optional wandb (``wandb.init`` kwargs), the progress bar."""

    tensorboard: bool = True
    wandb: dict[str, Any] | None = None
    progress: bool = True


@dataclass(frozen=True)
class RunConfig:
    """The typed run: every section, plus the composed tree it came from (saved with checkpoints)."""

    run: RunSection
    parallel: ParallelSection
    model: ModelSection
    tokenizer: TokenizerSection
    data: Any  # the task's own config dataclass (``data.task`` registry)
    sft: SFTSection
    trainer: TrainerSection
    optim: OptimSection
    rollout: RolloutSection
    eval: EvalSection
    reward: RewardSection
    algorithm: AlgorithmSetup
    checkpoint: CheckpointSection
    logging: LoggingSection
    tree: DictConfig
    megatron: MegatronSection = field(default_factory=MegatronSection)

    @property
    def seed(self) -> int:
        return self.run.seed

    def to_yaml(self) -> str:
        return OmegaConf.to_yaml(self.tree)


_SECTIONS = {
    "run": RunSection,
    "parallel": ParallelSection,
    "model": ModelSection,
    "tokenizer": TokenizerSection,
    "sft": SFTSection,
    "trainer": TrainerSection,
    "optim": OptimSection,
    "rollout": RolloutSection,
    "eval": EvalSection,
    "reward": RewardSection,
    "checkpoint": CheckpointSection,
    "logging": LoggingSection,
    "megatron": MegatronSection,
}


def build_run_config(tree: DictConfig) -> RunConfig:
    """Validate the composed config into a :class:`RunConfig`; raises ConfigError naming the key.

    Input paths (``model.path``, data files, ...) are made absolute first, relative to the
    working directory (:func:`~nemo_gdro.trainer.paths.resolve_input_paths`): the config a
    checkpoint stores still names the same files when read from elsewhere.
    """
    from nemo_gdro.registries import TASKS
    from nemo_gdro.trainer.paths import resolve_input_paths

    tree = resolve_input_paths(tree)
    data = OmegaConf.to_container(tree, resolve=True)
    assert isinstance(data, dict)
    known = set(_SECTIONS) | {"data", "algorithm"}
    unknown = sorted(set(data) - known)
    _require(not unknown, f"unknown top-level key(s) {', '.join(unknown)}; valid sections: {', '.join(sorted(known))}")

    # Runs saved before the reward section existed were arithmetic runs: their defaults.
    data.setdefault("reward", {})

    def section(name: str) -> Mapping[str, Any]:
        value = data.get(name)
        if value is None and name == "megatron":
            value = {}  # optional: plain Megatron
        _require(isinstance(value, Mapping), f"config section {name!r} is missing or not a mapping")
        return value  # type: ignore[return-value]

    try:
        sections = {name: build_section(cls, name, section(name)) for name, cls in _SECTIONS.items()}
        data_section = dict(section("data"))
        task_cls = TASKS.get(data_section.get("task"))
        task_config = build_section(task_cls.Config, "data", data_section)
        algorithm = AlgorithmSetup.from_dict(section("algorithm"), n_bar=sections["rollout"].n)
    except ValueError as err:  # registries' unknown names and the algorithm configs' own checks
        raise ConfigError(str(err)) from None
    cfg = RunConfig(data=task_config, algorithm=algorithm, tree=tree, **sections)
    _check_cross_section(cfg, task_cls)
    return cfg


def _check_cross_section(cfg: RunConfig, task_cls: Any) -> None:
    accepted = getattr(task_cls, "verifiers", None)
    _require(
        accepted is None or cfg.reward.verifier in accepted,
        f"reward.verifier={cfg.reward.verifier} does not score data.task={cfg.data.task} answers; "
        f"use one of: {', '.join(accepted or ())}",
    )
    # A task whose pool size is a config value (arithmetic) is checked here, without building it;
    # the others are checked against the loaded pool when the components are built.
    pool = getattr(cfg.data, "num_train", None)
    _require(
        pool is None or cfg.trainer.prompts_per_step <= pool,
        f"trainer.prompts_per_step={cfg.trainer.prompts_per_step} exceeds the {pool} training prompts of "
        f"data.task={cfg.data.task}",
    )
    budget, new = cfg.trainer.max_tokens_per_microbatch, cfg.rollout.max_new_tokens
    # A row is a prompt (>= 1 token) + up to max_new_tokens; the longest prompt is checked once the data is built.
    _require(
        budget is None or budget >= new + 1,
        f"trainer.max_tokens_per_microbatch={budget} is below the longest possible row: a prompt (at least 1 token) "
        f"+ rollout.max_new_tokens={new} needs at least {new + 1} tokens; set trainer.max_tokens_per_microbatch >= "
        f"the longest prompt's tokens + {new}, or null",
    )
    try:
        cfg.reward.overlong_config.validate(cfg.rollout.max_new_tokens)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    for module, extra in (("megatron", "megatron"), ("transformers", "hf")):
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"the training loop needs {module}: pip install 'nemo_gdro[{extra}]'")
    # FP8 / TE requests fail here, before anything is built (Megatron would fall back to bf16 silently).
    # Only the FP8 rule reads the dtype; resolving `auto` asks torch for CUDA, which a plain config need not import.
    dtype = cfg.model.resolved_dtype if cfg.megatron.fp8 is not None else cfg.model.dtype
    check_environment(cfg.megatron, params_dtype=dtype, tensor_parallel=cfg.parallel.tensor_parallel)
