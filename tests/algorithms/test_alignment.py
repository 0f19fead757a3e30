"""grpo_base.md §7 invariants 1-3 across modules: a ragged batch reordered by any
permutation gives the same per-row advantages, per-prompt statistics and bins
once mapped back through the permutation."""

import torch
from hypothesis import given
from hypothesis import strategies as st

from nemo_gdro.algorithms.advantages import grpo_advantages
from nemo_gdro.algorithms.difficulty import DifficultyClassifier, DifficultyConfig
from nemo_gdro.algorithms.prompt_gdro import (
    PromptGDRO,
    PromptGDROConfig,
    failure_signal,
)
from nemo_gdro.algorithms.stats import PromptStatsStore, StatsConfig, group_outcomes

NUM_PROMPTS = 40


def run_step(prompt_ids, group_index, rewards, store, clf, pgdro):
    """One step of the framework-free pipeline on whatever row order it is given."""
    bins = clf.classify(prompt_ids)
    adv = grpo_advantages(rewards, group_index, prompt_ids.numel())
    response_bins = bins[group_index]
    weights, _ = pgdro.response_weights(response_bins)
    n, c = group_outcomes(rewards, group_index, prompt_ids.numel())
    store.observe(prompt_ids, n, c)
    pgdro.observe(response_bins, failure_signal(rewards))
    return bins, adv, weights


def make_system():
    store = PromptStatsStore(NUM_PROMPTS, StatsConfig(window=8))
    return store, DifficultyClassifier(DifficultyConfig(hysteresis=0.0), store), PromptGDRO(PromptGDROConfig(), 10)


@given(seed=st.integers(0, 10_000), steps=st.integers(1, 4))
def test_shuffled_ragged_batches_give_the_same_results(seed, steps):
    g = torch.Generator().manual_seed(seed)
    ref, shuf = make_system(), make_system()
    for _ in range(steps):
        p = int(torch.randint(2, 8, (1,), generator=g))
        prompt_ids = torch.randperm(NUM_PROMPTS, generator=g)[:p]
        sizes = torch.randint(1, 6, (p,), generator=g)
        group_index = torch.repeat_interleave(torch.arange(p), sizes)
        # Each prompt has its own answer; a row is rewarded against its own prompt's answer.
        answers = torch.randint(0, 3, (NUM_PROMPTS,), generator=g)
        outputs = torch.randint(0, 3, (group_index.numel(),), generator=g)
        rewards = (outputs == answers[prompt_ids[group_index]]).float()

        bins_a, adv_a, w_a = run_step(prompt_ids, group_index, rewards, *ref)

        # Reorder prompts and rows independently (as DP balancing / length sorting would),
        # carrying every per-row field with its row.
        prompt_perm = torch.randperm(p, generator=g)
        inverse_prompt = torch.argsort(prompt_perm)
        row_perm = torch.randperm(group_index.numel(), generator=g)
        ids_b = prompt_ids[prompt_perm]
        gi_b = inverse_prompt[group_index[row_perm]]
        rewards_b = (outputs[row_perm] == answers[ids_b[gi_b]]).float()
        assert torch.equal(rewards_b, rewards[row_perm])

        bins_b, adv_b, w_b = run_step(ids_b, gi_b, rewards_b, *shuf)
        assert torch.equal(bins_b, bins_a[prompt_perm])
        torch.testing.assert_close(adv_b, adv_a[row_perm])
        torch.testing.assert_close(w_b, w_a[row_perm])

    for name in ("window_bits", "window_sum", "rollouts", "correct", "last_bin"):
        assert torch.equal(getattr(ref[0], name), getattr(shuf[0], name)), name
    torch.testing.assert_close(ref[2].scores, shuf[2].scores)


def test_controllers_sharing_the_store_only_read_it():
    """gdro.md §6.3: one statistic must not be updated twice per step. The store is
    written once per step by the loop; every controller only reads it."""
    from nemo_gdro.algorithms.dynamo_allocation import (
        DynamoAllocationConfig,
        DynamoAllocator,
    )
    from nemo_gdro.algorithms.rollout_gdro import RolloutGDRO, RolloutGDROConfig

    store = PromptStatsStore(NUM_PROMPTS, StatsConfig(window=8))
    store.observe(torch.arange(10), torch.full((10,), 4), torch.arange(10) % 5)
    clf = DifficultyClassifier(DifficultyConfig(), store)
    ids = torch.arange(12)
    bins = clf.classify(ids)  # writes last bins only
    before = {k: v.clone() for k, v in store.state_dict().items() if isinstance(v, torch.Tensor)}
    RolloutGDRO(RolloutGDROConfig(), clf.num_bins, store).allocate(ids, bins)
    DynamoAllocator(DynamoAllocationConfig(n_bar=4, n_min=2, n_max=8), store).allocate(ids)
    clf.classify(ids)
    for name, value in store.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, before[name]), name
