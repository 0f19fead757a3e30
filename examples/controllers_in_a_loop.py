"""The algorithm core driven by a simulated prompt population (no model).

Each prompt has a latent pass rate; a rollout succeeds with that probability.
The loop runs the order of one training step (classify before generation,
observe after rewards) and prints how the controllers react: bin shares,
Prompt-GDRO weights per bin, and rollouts per prompt under Rollout-GDRO (sqrt)
and DynaMO. Run: python examples/controllers_in_a_loop.py
"""

import torch

from nemo_gdro.algorithms.advantages import grpo_advantages
from nemo_gdro.algorithms.difficulty import DifficultyClassifier, DifficultyConfig
from nemo_gdro.algorithms.dynamo_allocation import (
    DynamoAllocationConfig,
    DynamoAllocator,
)
from nemo_gdro.algorithms.prompt_gdro import (
    PromptGDRO,
    PromptGDROConfig,
    failure_signal,
)
from nemo_gdro.algorithms.rollout_gdro import RolloutGDRO, RolloutGDROConfig
from nemo_gdro.algorithms.stats import PromptStatsStore, group_outcomes

NUM_PROMPTS, P, STEPS = 2_000, 64, 40
g = torch.Generator().manual_seed(0)
pass_rate = torch.rand(NUM_PROMPTS, generator=g) ** 3  # many hard prompts, few easy ones

store = PromptStatsStore(NUM_PROMPTS)
classifier = DifficultyClassifier(DifficultyConfig(), store)
prompt_gdro = PromptGDRO(PromptGDROConfig(signal="failure"), classifier.num_bins)
rollout_gdro = RolloutGDRO(RolloutGDROConfig(), classifier.num_bins, store)
dynamo = DynamoAllocator(DynamoAllocationConfig(n_bar=4, n_min=2, n_max=12), store)

for step in range(STEPS):
    ids = torch.randint(0, NUM_PROMPTS, (P,), generator=g)
    bins = classifier.classify(ids)
    plan = rollout_gdro.allocate(ids, bins)
    dynamo_counts = dynamo.allocate(ids).counts
    group_index = torch.repeat_interleave(torch.arange(P), plan.counts)
    rewards = (torch.rand(group_index.numel(), generator=g) < pass_rate[ids][group_index]).float()
    response_bins = bins[group_index]
    weights, w_bin = prompt_gdro.response_weights(response_bins)
    advantages = grpo_advantages(rewards, group_index, P) * weights.float()
    store.observe(ids, *group_outcomes(rewards, group_index, P))
    signal = failure_signal(rewards)
    prompt_gdro.observe(response_bins, signal)
    rollout_gdro.observe(response_bins, signal, plan, bins)
    if step % 10 == 9:
        share = torch.bincount(bins, minlength=classifier.num_bins).float() / P
        print(f"step {step + 1}: reward {rewards.mean():.3f}, rollouts {int(plan.counts.sum())} (= {P} x 4)")
        print("  bin share      ", " ".join(f"{s:5.2f}" for s in share.tolist()))
        print("  GDRO weight    ", " ".join(f"{w:5.2f}" for w in w_bin.tolist()))
        print("  n_b (sqrt)     ", " ".join("  -  " if n != n else f"{n:5.2f}" for n in plan.per_bin_n.tolist()))
        print(f"  DynaMO n range  {int(dynamo_counts.min())}..{int(dynamo_counts.max())}, mu {plan.mu:.4f}")
