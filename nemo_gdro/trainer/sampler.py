"""Uniform prompt sampler: one seeded permutation per epoch, exact resume.

The permutation of epoch e is a pure function of ``(seed, e)``, so the state is
two integers and a resumed run draws the same prompts as an uninterrupted one.
"""

from __future__ import annotations

import torch


class EpochSampler:
    """Draws prompt ids without replacement within an epoch."""

    def __init__(self, num_prompts: int, seed: int) -> None:
        if num_prompts < 1:
            raise ValueError(f"num_prompts must be >= 1, got {num_prompts}")
        self.num_prompts = int(num_prompts)
        self.seed = int(seed)
        self.epoch = 0
        self.position = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_prompts, generator=g)

    def next(self, count: int) -> tuple[torch.Tensor, bool]:
        """The next ``count`` prompt ids (int64 ``[count]``) and whether an epoch began."""
        out: list[torch.Tensor] = []
        new_epoch = False
        while count > 0:
            if self.position == self.num_prompts:
                self.epoch += 1
                self.position = 0
                self._order = self._permutation(self.epoch)
                new_epoch = True
            take = min(count, self.num_prompts - self.position)
            out.append(self._order[self.position : self.position + take])
            self.position += take
            count -= take
        return torch.cat(out), new_epoch

    def state_dict(self) -> dict:
        return {"num_prompts": self.num_prompts, "seed": self.seed, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        if (state["num_prompts"], state["seed"]) != (self.num_prompts, self.seed):
            raise ValueError(
                f"sampler checkpoint is for {state['num_prompts']} prompts / seed {state['seed']}, "
                f"this run has {self.num_prompts} / {self.seed}"
            )
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._order = self._permutation(self.epoch)
