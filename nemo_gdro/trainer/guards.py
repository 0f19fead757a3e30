"""The divergence guard: no update, checkpoint or resume from non-finite numbers.

:class:`UpdateGuard` decides, before every optimizer step, whether the step
may be applied: the loss (summed over micro-batches and DP ranks, identical on
every rank) and the gradients (checked on every rank, agreed over the world)
must be finite. ``trainer.on_nonfinite=stop`` (default) raises
:class:`~nemo_gdro.trainer.errors.NonFiniteError` naming the step;
``skip`` drops that optimizer step (the weights and the Adam state stay as
they were), counts it in the metrics (``guard/skipped_updates``) and stops
after ``trainer.max_consecutive_skips`` skipped steps in a row.

:func:`first_nonfinite` finds a non-finite tensor in a nested state; the
checkpoint writer refuses to publish one (:mod:`nemo_gdro.trainer.run_state`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from nemo_gdro.parallel import comm
from nemo_gdro.trainer.errors import NonFiniteError

__all__ = ["UpdateGuard", "any_rank", "first_nonfinite", "sampling_failure"]

_HINT = (
    "lower optim.lr (or sft.lr), check the data and the rewards, or set trainer.on_nonfinite=skip to drop such "
    "updates; the checkpoints already written are finite and kept"
)


def any_rank(flag: bool) -> bool:
    """``flag`` OR-ed over every process of the job (no communication in a single process)."""
    if comm.group_size() == 1:
        return flag
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0], dtype=torch.float64)
    return bool(comm.all_reduce(t, op=dist.ReduceOp.MAX)[0] > 0)


def first_nonfinite(state: Any, prefix: str = "") -> str | None:
    """Dotted path of the first floating-point tensor (or float) in ``state`` holding NaN/inf, else None."""
    if isinstance(state, torch.Tensor):
        if state.is_floating_point() and state.numel() and not bool(torch.isfinite(state).all()):
            return prefix or "<tensor>"
        return None
    if isinstance(state, float):
        return None if math.isfinite(state) else (prefix or "<value>")
    if isinstance(state, Mapping):
        items = state.items()
    elif isinstance(state, (list, tuple)):
        items = enumerate(state)
    else:
        return None
    for key, value in items:
        found = first_nonfinite(value, f"{prefix}.{key}" if prefix else str(key))
        if found is not None:
            return found
    return None


def sampling_failure(err: BaseException, step: int, what: str) -> NonFiniteError | None:
    """The one-line error for a generation that failed on non-finite probabilities (a diverged policy), else None."""
    text = str(err)
    if "inf" not in text and "nan" not in text:
        return None
    return NonFiniteError(
        f"step {step}: {what} failed on non-finite sampling probabilities ({text.splitlines()[0][:120]}): the "
        f"policy's logits overflowed (it diverged). {_HINT}"
    )


class UpdateGuard:
    """Allows or refuses each optimizer step (see the module docstring); checkpointed with the controllers.

    Args:
        policy: ``stop`` or ``skip`` (``trainer.on_nonfinite``).
        max_consecutive: skipped optimizer steps in a row after which ``skip`` stops too.
    """

    def __init__(self, policy: str = "stop", max_consecutive: int = 5) -> None:
        if policy not in ("stop", "skip"):
            raise ValueError(f"trainer.on_nonfinite must be 'stop' or 'skip', got {policy!r}")
        self.policy = policy
        self.max_consecutive = int(max_consecutive)
        self.skipped_total = 0
        self.consecutive = 0

    def allow(self, step: int, loss: float, grads_finite: bool) -> bool:
        """Whether the optimizer step of RL step ``step`` (1-based, as logged) may be applied."""
        bad = [name for name, ok in (("loss", math.isfinite(loss)), ("gradients", grads_finite)) if not ok]
        if not bad:
            self.consecutive = 0
            return True
        what = " and ".join(bad)
        if self.policy == "stop":
            raise NonFiniteError(f"step {step}: non-finite {what} (loss {loss}); the update was not applied. {_HINT}")
        self.skipped_total += 1
        self.consecutive += 1
        if self.consecutive > self.max_consecutive:
            raise NonFiniteError(
                f"step {step}: non-finite {what} in {self.consecutive} optimizer steps in a row "
                f"(trainer.max_consecutive_skips={self.max_consecutive}); the run is not recovering. {_HINT}"
            )
        return False

    def check_weights(self, step: int, finite: bool) -> None:
        """After an applied update: weights that overflowed stop the run whatever the policy."""
        if not finite:
            raise NonFiniteError(f"step {step}: the update made the weights non-finite (overflow). {_HINT}")

    def state_dict(self) -> dict[str, int]:
        return {"skipped_total": self.skipped_total, "consecutive": self.consecutive}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.skipped_total = int(state["skipped_total"])
        self.consecutive = int(state["consecutive"])
