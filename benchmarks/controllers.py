"""Per-step cost of the controllers: classify + allocate + weights + observe.

Prints the median wall time per step (ms) for P x n_bar in {256 x 4, 512 x 16}
with a per-prompt store of 14.1k prompts (DAPO-Math English) and of 10M
prompts, for three stacks:

- ``gdro-sqrt``: classifier, Prompt-GDRO advantage weights, Rollout-GDRO sqrt;
- ``gdro-bandit``: the same with Rollout-GDRO's bandit (exact-budget DP);
- ``dynamo``: DynaMO allocation.

Each timed step also computes GRPO advantages and the per-prompt outcomes and
updates every controller (the "driver-side advantage stage" the GDRO paper
times at 0.355 s/step for Prompt-GDRO). Rewards are simulated outside the timed
region from a fixed per-prompt pass rate, so the controllers see realistic,
evolving statistics. Targets (issue #2): < 5 ms at 256 x 4 with 14.1k prompts,
and the 10M store no more than 1.3x slower than the 14.1k one.

Usage: python benchmarks/controllers.py [--steps 60] [--warmup-steps 20] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

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

SHAPES = [(256, 4, 2, 12), (512, 16, 8, 24)]
STORE_SIZES = [14_100, 10_000_000]
STACKS = ["gdro-sqrt", "gdro-bandit", "dynamo"]


class Stack:
    """One controller configuration driven step by step."""

    def __init__(self, kind: str, num_prompts: int, n_bar: int, n_min: int, n_max: int) -> None:
        self.kind = kind
        self.store = PromptStatsStore(num_prompts)
        self.classifier = DifficultyClassifier(DifficultyConfig(), self.store)
        bins = self.classifier.num_bins
        self.prompt_gdro = PromptGDRO(PromptGDROConfig(signal="failure"), bins)
        if kind == "dynamo":
            self.allocator = DynamoAllocator(DynamoAllocationConfig(n_bar=n_bar, n_min=n_min, n_max=n_max), self.store)
        else:
            mode = "sqrt" if kind == "gdro-sqrt" else "bandit"
            self.allocator = RolloutGDRO(
                RolloutGDROConfig(mode=mode, n_bar=n_bar, n_min=n_min, n_max=n_max), bins, self.store
            )

    def plan(self, prompt_ids: torch.Tensor):
        """Before generation: bins and rollouts per prompt."""
        bins = self.classifier.classify(prompt_ids)
        if self.kind == "dynamo":
            alloc = self.allocator.allocate(prompt_ids)
        else:
            alloc = self.allocator.allocate(prompt_ids, bins)
        return bins, alloc

    def learn(self, prompt_ids, bins, alloc, group_index, rewards) -> None:
        """After rewards: advantages, weights, and every controller's update."""
        num = prompt_ids.numel()
        advantages = grpo_advantages(rewards, group_index, num)
        response_bins = bins[group_index]
        weights, _ = self.prompt_gdro.response_weights(response_bins)
        _ = advantages * weights.to(advantages.dtype)
        rollouts, correct = group_outcomes(rewards, group_index, num)
        self.store.observe(prompt_ids, rollouts, correct)
        signal = failure_signal(rewards)
        self.prompt_gdro.observe(response_bins, signal)
        if self.kind != "dynamo":
            self.allocator.observe(response_bins, signal, alloc, bins, group_index=group_index)


def run(kind: str, num_prompts: int, shape, steps: int, warmup_steps: int, seed: int = 0) -> float:
    p, n_bar, n_min, n_max = shape
    g = torch.Generator().manual_seed(seed)
    stack = Stack(kind, num_prompts, n_bar, n_min, n_max)
    # Only prompts that are drawn ever need a true pass rate.
    pass_rate: dict[int, float] = {}
    times = []
    for step in range(warmup_steps + steps):
        prompt_ids = torch.randint(0, num_prompts, (p,), generator=g)
        # A fraction of repeats so prompts build up history, as over epochs.
        if step > 0:
            repeat = torch.rand(p, generator=g) < 0.5
            prompt_ids = torch.where(repeat, last_ids[torch.randperm(p, generator=g)], prompt_ids)
        last_ids = prompt_ids
        t0 = time.perf_counter()
        bins, alloc = stack.plan(prompt_ids)
        t1 = time.perf_counter()
        counts = alloc.counts
        group_index = torch.repeat_interleave(torch.arange(p), counts)
        rates = torch.tensor(
            [pass_rate.setdefault(i, float(torch.rand(1, generator=g)) ** 2) for i in prompt_ids.tolist()]
        )
        rewards = (torch.rand(group_index.numel(), generator=g) < rates[group_index]).float()
        t2 = time.perf_counter()
        stack.learn(prompt_ids, bins, alloc, group_index, rewards)
        t3 = time.perf_counter()
        if step >= warmup_steps:
            times.append((t1 - t0) + (t3 - t2))
    return statistics.median(times) * 1e3


def store_megabytes(num_prompts: int) -> float:
    s = PromptStatsStore(num_prompts)
    tensors = [v for v in s.state_dict().values() if isinstance(v, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {args.threads}, median of {args.steps} steps after {args.warmup_steps} warm-up")
    for n in STORE_SIZES:
        print(f"store of {n:>10,d} prompts: {store_megabytes(n):8.1f} MiB")
    header = f"{'stack':<12} {'P x n_bar':<10} " + " ".join(f"{f'{n:,d} (ms)':>16}" for n in STORE_SIZES) + f" {'ratio':>7}"
    print(header)
    for shape in SHAPES:
        for kind in STACKS:
            ms = [run(kind, n, shape, args.steps, args.warmup_steps) for n in STORE_SIZES]
            print(
                f"{kind:<12} {f'{shape[0]} x {shape[1]}':<10} "
                + " ".join(f"{m:>16.2f}" for m in ms)
                + f" {ms[1] / ms[0]:>7.2f}"
            )


if __name__ == "__main__":
    main()
