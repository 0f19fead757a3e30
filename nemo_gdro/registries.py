"""Every component a config chooses by name, in one place: the plugin's shape.

Algorithm stages (``algorithm.*``, see :mod:`nemo_gdro.stages`): each entry is
a class with ``from_context(ctx: StageContext)``. Task side: each entry is a
builder documented where it is defined. Names are what the YAML says;
targets are imported only when chosen.
"""

from __future__ import annotations

from nemo_gdro.registry import Registry

PROMPT_SCHEDULERS = Registry(
    "prompt scheduler",
    "algorithm.prompt_scheduler",
    {
        "uniform": "nemo_gdro.stages.prompt:UniformPrompts",
        "prompt_gdro_resample": "nemo_gdro.stages.prompt:PromptGDROResample",
        "skip_zero_variance": "nemo_gdro.stages.prompt_skip:ZeroVarianceSkipPrompts",
    },
)
ROLLOUT_SCHEDULERS = Registry(
    "rollout scheduler",
    "algorithm.rollout_scheduler",
    {
        "fixed": "nemo_gdro.stages.rollout:FixedRollouts",
        "rollout_gdro": "nemo_gdro.stages.rollout:RolloutGDROScheduler",
        "dynamo": "nemo_gdro.stages.rollout:DynamoScheduler",
    },
)
ADVANTAGE_WEIGHTINGS = Registry(
    "advantage weighting",
    "algorithm.advantage_weighting",
    {
        "none": "nemo_gdro.stages.advantage:NoWeighting",
        "prompt_gdro": "nemo_gdro.stages.advantage:PromptGDROWeighting",
    },
)
TOKEN_MODULATIONS = Registry(
    "token modulation",
    "algorithm.token_modulation",
    {
        "none": "nemo_gdro.stages.modulation:NoModulation",
        "dynamo": "nemo_gdro.stages.modulation:DynamoModulation",
    },
)
POLICY_LOSSES = Registry(
    "policy loss",
    "algorithm.loss",
    {
        "clipped": "nemo_gdro.stages.loss:ClippedLoss",
        "r2vpo": "nemo_gdro.stages.loss:R2VPOLoss",
    },
)

#: ``algorithm.<key>`` -> its registry.
STAGE_REGISTRIES: dict[str, Registry] = {
    "prompt_scheduler": PROMPT_SCHEDULERS,
    "rollout_scheduler": ROLLOUT_SCHEDULERS,
    "advantage_weighting": ADVANTAGE_WEIGHTINGS,
    "token_modulation": TOKEN_MODULATIONS,
    "loss": POLICY_LOSSES,
}

# --------------------------------------------------------------------- task side
#: ``data.task``: a task class with ``Config`` (its ``data`` section), ``verifiers`` (the
#: ``reward.verifier`` names that score its answers) and ``build(config, tokenizer, verifiers) -> Task``
#: (train pool, eval suites, verifier, SFT examples), where ``verifiers.for_answer_type("math" | "choice")``
#: gives the run's verifiers (:class:`~nemo_gdro.rewards.verifier_set.VerifierSet`).
TASKS = Registry(
    "task", "data.task", {"arithmetic": "nemo_gdro.tasks.arithmetic:ArithmeticTask", "math": "nemo_gdro.tasks.math:MathTask"}
)

#: ``tokenizer.name``: ``build(section, model_section) -> tokenizer`` (the tokenizer contract).
TOKENIZERS = Registry(
    "tokenizer",
    "tokenizer.name",
    {"char": "nemo_gdro.tasks.tokenizers:build_char_tokenizer", "hf": "nemo_gdro.tasks.tokenizers:build_hf_tokenizer"},
)

#: ``model.source``: ``build(section, tokenizer) -> ModelInit`` (architecture, initial weights).
MODEL_SOURCES = Registry(
    "model source",
    "model.source",
    {"preset": "nemo_gdro.models.sources:PresetSource", "hf": "nemo_gdro.models.sources:HFSource"},
)

#: ``rollout.engine``: ``build(context) -> engine`` (the rollout engine contract).
ROLLOUT_ENGINES = Registry(
    "rollout engine",
    "rollout.engine",
    {"hf": "nemo_gdro.rollout.engines:build_hf_engine", "vllm": "nemo_gdro.rollout.engines:build_vllm_engine"},
)
