"""The plugin's stages driven by a simulated prompt population (no model, no trainer).

Each prompt has a latent pass rate; a rollout succeeds with that probability.
The loop runs the order of one training step through the public stage API
(:mod:`nemo_gdro.stages`): draw prompts, classify them from their history,
allocate rollouts, score, weight advantages, observe. It prints how the
controllers react for two stacks chosen by name, exactly as the YAML would:
Prompt-GDRO advantage weights + Rollout-GDRO (sqrt), and DynaMO's allocator. Run: python examples/controllers_in_a_loop.py
"""

import torch

from nemo_gdro.algorithms.advantages import grpo_advantages
from nemo_gdro.algorithms.difficulty import DifficultyClassifier
from nemo_gdro.algorithms.stats import PromptStatsStore, group_outcomes
from nemo_gdro.stages import AlgorithmSetup, StageContext, StepFeedback, build_stages
from nemo_gdro.stages.signal import controller_signal
from nemo_gdro.trainer.config import compose

NUM_PROMPTS, P, N_BAR, STEPS = 400, 64, 4, 40  # every prompt revisited ~6 times

STACKS = {
    "gdro": {"advantage_weighting": "prompt_gdro", "rollout_scheduler": "rollout_gdro"},
    "dynamo": {"rollout_scheduler": "dynamo"},
}


def algorithm_section(choices: dict[str, str]) -> dict:
    """The default ``algorithm`` section of conf/train.yaml with some stages chosen and the paper's-style bounds."""
    from omegaconf import OmegaConf

    section = OmegaConf.to_container(compose().algorithm, resolve=True)
    section.update(choices)
    section["prompt_gdro"]["signal"] = "failure"  # the simulation has no policy loss to take a surrogate from
    section["dynamo"]["allocation"].update(n_min=2, n_max=12)
    return section


def simulate(name: str, choices: dict[str, str]) -> None:
    g = torch.Generator().manual_seed(0)
    pass_rate = torch.rand(NUM_PROMPTS, generator=g) ** 3  # many hard prompts, few easy ones
    setup = AlgorithmSetup.from_dict(algorithm_section(choices), n_bar=N_BAR)
    store = PromptStatsStore(NUM_PROMPTS, setup.stats)
    classifier = DifficultyClassifier(setup.difficulty, store)
    stages = build_stages(StageContext(setup, store, classifier, NUM_PROMPTS, seed=0))
    print(f"== {name}: {setup.describe()}")
    for step in range(STEPS):
        draw = stages.prompts.draw(P)
        bins = classifier.classify(draw.ids)
        allocation = stages.rollouts.allocate(draw, bins)
        group_index = torch.repeat_interleave(torch.arange(P), allocation.counts)
        rewards = (torch.rand(group_index.numel(), generator=g) < pass_rate[draw.ids][group_index]).float()
        response_bins = bins[group_index]
        advantages = grpo_advantages(rewards, group_index, P)
        # The informative rows (non-zero advantage) let Prompt-GDRO normalise over them (normalize_over).
        weights, w_bin = stages.weighting.weights(response_bins, advantages != 0)
        if weights is not None:
            advantages = advantages * weights.float()  # what the policy loss would train on
        store.observe(draw.ids, *group_outcomes(rewards, group_index, P))
        signal = controller_signal(
            setup.prompt_gdro.signal, torch.full_like(rewards, float("nan"), dtype=torch.float64), rewards,
            group_index, P, reward_range=(0.0, 1.0), correct_threshold=0.5,
        )
        feedback = StepFeedback(draw, bins, allocation, response_bins, group_index, rewards, signal, w_bin)
        for observer in stages.observers:
            observer.observe(feedback)
        if step % 10 == 9:
            share = torch.bincount(bins, minlength=classifier.num_bins).float() / P
            print(f"step {step + 1}: reward {rewards.mean():.3f}, rollouts {int(allocation.counts.sum())} (= {P} x {N_BAR})")
            print("  bin share      ", " ".join(f"{s:5.2f}" for s in share.tolist()))
            if w_bin is not None:
                print("  GDRO weight    ", " ".join(f"{w:5.2f}" for w in w_bin.tolist()))
            counts = allocation.counts
            print(f"  rollouts per prompt {int(counts.min())}..{int(counts.max())}")


if __name__ == "__main__":
    for stack_name, stack in STACKS.items():
        simulate(stack_name, stack)
