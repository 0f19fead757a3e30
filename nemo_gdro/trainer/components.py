"""The composition root: every component of a run, built from the typed config.

Each component the config names is resolved through its registry
(:mod:`nemo_gdro.registries`): the task (``data.task``), the tokenizer
(``tokenizer.name``), the model source (``model.source``), the rollout
engines (``rollout.engine``), the verifiers (``reward``, handed to the task
as a :class:`~nemo_gdro.rewards.verifier_set.VerifierSet`) and the five
algorithm stages. Nothing else in
the trainer constructs components, and :meth:`Components.stateful` is the one
list of what goes into a checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from nemo_gdro.algorithms.difficulty import DifficultyClassifier
from nemo_gdro.parallel.rows import DataParallel
from nemo_gdro.parallel.sharded_stats import ShardedPromptStats, checksum
from nemo_gdro.registries import MODEL_SOURCES, ROLLOUT_ENGINES, TASKS, TOKENIZERS
from nemo_gdro.rewards.verifier_set import VerifierSet
from nemo_gdro.rollout.engines import EngineRequest
from nemo_gdro.rollout.sampling import SamplingConfig
from nemo_gdro.stages import StageContext, Stages, build_stages
from nemo_gdro.tasks.base import Task
from nemo_gdro.trainer.preflight import check_model_layout, check_token_budget
from nemo_gdro.trainer.replay import GroupReplay, NoReplay, ReplayBuffer
from nemo_gdro.trainer.resume_check import check_same_config_across_ranks
from nemo_gdro.trainer.run_config import RunConfig
from nemo_gdro.typed_config import ConfigError

__all__ = ["Components", "Stateful", "build_components", "KLReference", "NoReference"]


@dataclass(frozen=True)
class Stateful:
    """A checkpointed component: ``replicated`` state is identical on every DP rank (saved
    once, checked across ranks every step when ``verify``), ``per_rank`` is saved by every rank
    (and restored with ``load_resharded(shards of every saved DP rank)``; with ``verify`` its
    ``replicated_state()`` is what the ranks must agree on)."""

    obj: Any
    scope: str = "replicated"
    verify: bool = False


class NoReference:
    """No KL penalty: no reference policy is kept."""

    def freeze_from(self, actor: Any) -> None:
        pass

    def extras(self, tokens: Any, lengths: Any = None) -> dict[str, Any]:
        return {}

    def stateful(self) -> dict[str, Stateful]:
        return {}


class KLReference:
    """A frozen copy of the policy at the start of RL; its log-probs feed the k3 KL term."""

    def __init__(self, build_actor: Any) -> None:
        self._build_actor = build_actor
        self.actor: Any = None

    def freeze_from(self, actor: Any) -> None:
        if self.actor is None:
            self.actor = self._build_actor()
            self.actor.load_state_dict(actor.state_dict())

    def extras(self, tokens: Any, lengths: Any = None) -> dict[str, Any]:
        return {"ref_logp": self.actor.compute_token_stats(tokens, lengths=lengths)["logp"]}

    def stateful(self) -> dict[str, Stateful]:
        return {"reference": Stateful(self.actor, scope="model")} if self.actor is not None else {}


@dataclass
class Components:
    """Everything a run is made of (built once by :func:`build_components`)."""

    cfg: RunConfig
    dist: Any
    dp: DataParallel
    tokenizer: Any
    task: Task
    spec: Any
    hf_config: Any
    actor: Any
    rl_optim: Any
    reference: Any
    engine: Any
    eval_engine: Any
    store: ShardedPromptStats
    classifier: DifficultyClassifier
    stages: Stages
    replay: Any
    verifiers: VerifierSet
    extra_state: dict[str, Stateful] = field(default_factory=dict)

    @property
    def model_parallel(self) -> int:
        return self.dist.tensor_parallel * self.dist.pipeline_parallel

    def stateful(self) -> dict[str, Stateful]:
        """Checkpoint name -> component: the one list of what a checkpoint holds besides the actor.

        ``model`` scope (the actor and the KL reference) is replicated under
        plain DP and sliced under TP/PP (see :mod:`nemo_gdro.trainer.run_state`).
        """
        out: dict[str, Stateful] = {"classifier": Stateful(self.classifier)}
        verified = {"prompt_gdro", "rollout_gdro", "dual", "prompt_skip"}
        for name, obj in self.stages.stateful().items():
            out[name] = Stateful(obj, verify=name in verified)
        out.update({name: Stateful(obj, scope="per_rank", verify=True) for name, obj in self.replay.stateful().items()})
        out["prompt_stats"] = Stateful(self.store, scope="per_rank")
        out.update(self.reference.stateful())
        out.update(self.extra_state)
        return out

    def verify_replicated(self, step: int, decisions: dict[str, Any]) -> None:
        """Fail loudly if replicated decisions or controller state differ across DP ranks."""
        if self.dp.size == 1:
            return
        state = dict(decisions)
        for name, item in self.stateful().items():
            if item.verify and item.scope == "per_rank":
                state[name] = item.obj.replicated_state()
            elif item.verify:
                state[name] = {k: v for k, v in item.obj.state_dict().items() if k != "rng"}
        checksum(state, group=self.dp.group, step=step)

    def close(self) -> None:
        """Stop the verifiers' worker processes (the process groups are the trainer's)."""
        self.verifiers.close()

    def enter_rl_phase(self) -> None:
        """Switch the actor's optimizer to the RL settings; freeze the KL reference (if any)."""
        self.actor.reset_optimizer(self.rl_optim)
        self.reference.freeze_from(self.actor)


def tear_down(components: Components | None) -> None:
    """Stop ``components``' workers and tear down the process groups (also after a failed build:
    ``None``). Megatron is imported for it only when something was built."""
    import torch.distributed

    try:
        if components is not None:
            components.close()
    finally:
        if components is not None or torch.distributed.is_initialized():
            from nemo_gdro.parallel.distributed import destroy_distributed

            destroy_distributed()


def _sampling(section: Any, max_new_tokens: int) -> SamplingConfig:
    return SamplingConfig(
        temperature=section.temperature, top_p=section.top_p, top_k=section.top_k, max_new_tokens=max_new_tokens
    )


def build_components(cfg: RunConfig) -> Components:
    """Initialise the process groups and build every component (collective).

    The verifiers' worker pools start first (their imports overlap with the
    model build) and are closed again if anything after them fails.
    """
    from nemo_gdro.models.fp8 import apply_fp8_environment, fp8_environment
    from nemo_gdro.models.megatron_options import host_info

    # TE reads its FP8 environment when imported, and `import megatron.core` imports TE.
    apply_fp8_environment(fp8_environment(cfg.megatron.fp8_recipe if cfg.megatron.fp8 else None, host_info().sm))
    try:
        tokenizer = TOKENIZERS.get(cfg.tokenizer.name)(cfg.tokenizer, cfg.model)
    except (ValueError, OSError) as err:
        raise _config_error(err) from None
    reward = cfg.reward
    verifiers = VerifierSet(reward.verifier_config, reward.choice_verifier)
    try:
        return _build(cfg, tokenizer, verifiers)
    except BaseException:
        verifiers.close()
        raise


def _config_error(err: Exception) -> ConfigError:
    return err if isinstance(err, ConfigError) else ConfigError(str(err))


def _build(cfg: RunConfig, tokenizer: Any, verifiers: VerifierSet) -> Components:
    from nemo_gdro.models.megatron_options import check_model

    try:  # a bad data file, column or row is a configuration error naming it
        task = TASKS.get(cfg.data.task).build(cfg.data, tokenizer, verifiers)
    except (ValueError, OSError) as err:
        raise _config_error(err) from None
    if cfg.trainer.prompts_per_step > len(task.train):
        raise ConfigError(
            f"trainer.prompts_per_step={cfg.trainer.prompts_per_step} exceeds the {len(task.train)} training "
            f"prompts of data.task={cfg.data.task}"
        )
    if cfg.sft.steps > 0 and task.sft is None:
        raise ConfigError(f"sft.steps={cfg.sft.steps} but data.task={cfg.data.task} has no worked examples; set sft.steps=0")
    check_token_budget(cfg, task, tokenizer)  # the data is known: the longest row must fit a micro-batch
    # Heavy imports after the cheap checks, so that those fail in seconds.
    from megatron.core import parallel_state

    from nemo_gdro.models.hf_mapping import hf_config
    from nemo_gdro.parallel.distributed import init_distributed
    from nemo_gdro.trainer.actor import MegatronActor, OptimConfig

    try:
        init = MODEL_SOURCES.get(cfg.model.source).build(cfg.model, tokenizer)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    # The architecture is known: layer counts and FP8 GEMM shapes, before any process group exists.
    check_model(cfg.megatron, init.spec, tensor_parallel=cfg.parallel.tensor_parallel,
                pipeline_parallel=cfg.parallel.pipeline_parallel)
    check_model_layout(init.spec, cfg.parallel)

    p = cfg.parallel
    dist = init_distributed(
        tensor_parallel=p.tensor_parallel, pipeline_parallel=p.pipeline_parallel, seed=cfg.seed, timeout_s=p.timeout_s
    )
    check_same_config_across_ranks(cfg.to_yaml())
    dp = DataParallel(
        rank=dist.dp_rank,
        size=dist.data_parallel,
        group=parallel_state.get_data_parallel_group(),
        pipeline_size=dist.pipeline_parallel,
        pipeline_group=parallel_state.get_pipeline_model_parallel_group(),
    )
    hf_cfg = hf_config(init.spec)
    build_engine = ROLLOUT_ENGINES.get(cfg.rollout.engine)
    max_new, options = cfg.rollout.max_new_tokens, cfg.rollout.vllm_options
    # Sampling seeds come per prompt from (run seed, step, prompt id), identical on every rank.
    engine = build_engine(EngineRequest(hf_cfg, tokenizer, _sampling(cfg.rollout, max_new), cfg.seed, options=options))
    eval_engine = build_engine(
        EngineRequest(hf_cfg, tokenizer, _sampling(cfg.eval, max_new), cfg.seed, role="eval", options=options, shared=engine)
    )

    o, s, mbs = cfg.optim, cfg.sft, cfg.trainer.micro_batch_size
    rl_optim = OptimConfig(
        lr=o.lr, weight_decay=o.weight_decay, betas=o.betas, eps=o.eps, grad_clip=o.grad_clip,
        warmup_steps=o.warmup_steps, micro_batch_size=mbs,
        max_tokens_per_microbatch=cfg.trainer.max_tokens_per_microbatch,
    )
    sft_optim = OptimConfig(
        lr=s.lr, weight_decay=s.weight_decay, betas=o.betas, eps=o.eps, grad_clip=o.grad_clip,
        warmup_steps=s.warmup_steps, micro_batch_size=mbs,
        max_tokens_per_microbatch=cfg.trainer.max_tokens_per_microbatch,
    )
    temperature = cfg.rollout.temperature
    store = ShardedPromptStats(
        len(task.train), cfg.algorithm.stats, group=dp.group, gather_capacity=-(-cfg.trainer.prompts_per_step // dp.size)
    )
    classifier = DifficultyClassifier(cfg.algorithm.difficulty, store)
    ctx = StageContext(
        setup=cfg.algorithm, store=store, classifier=classifier, num_prompts=len(task.train), seed=cfg.seed,
        reward_range=task.verifier.reward_range, dp=dp,
    )
    stages = build_stages(ctx)

    def new_actor(optim: OptimConfig, ebar: bool) -> MegatronActor:
        return MegatronActor(
            init.spec, optim, seed=cfg.seed, temperature=temperature, params_dtype=cfg.model.torch_dtype,
            megatron=cfg.megatron, ebar=ebar,
        )

    # The stages decide which token statistics the loss passes compute (DynaMO's exact Ebar only
    # when a stage reads it); the KL reference needs log-probs only.
    actor = new_actor(sft_optim, stages.needs_ebar)
    init.initialize(actor)
    reference = (
        KLReference(lambda: new_actor(rl_optim, False)) if cfg.algorithm.policy_loss.kl_coef > 0 else NoReference()
    )

    replay_cfg = cfg.algorithm.replay
    replay = (
        GroupReplay(ReplayBuffer(replay_cfg.staleness, cfg.seed), replay_cfg.ratio, dp.rank, dp.size)
        if cfg.algorithm.replays
        else NoReplay()
    )
    return Components(
        cfg=cfg, dist=dist, dp=dp, tokenizer=tokenizer, task=task, spec=init.spec, hf_config=hf_cfg, actor=actor,
        rl_optim=rl_optim, reference=reference, engine=engine, eval_engine=eval_engine, store=store,
        classifier=classifier, stages=stages, replay=replay, verifiers=verifiers,
    )
