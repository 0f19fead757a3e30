"""The run's verifiers by answer type, built from the ``reward`` section (what tasks receive).

A task's ``build(config, tokenizer, verifiers)`` asks ``verifiers.for_answer_type(kind)``:

- ``"math"``: free-form answers (integers, expressions, LaTeX): the configured
  ``reward.verifier`` (``arithmetic`` for the synthetic task, ``dapo_math`` /
  ``math_verify`` for math) with ``reward.options``;
- ``"choice"``: multiple-choice letters (GPQA-Diamond): ``reward.choice_verifier``
  with its default options.

Each kind is one :class:`~nemo_gdro.rewards.pool.PooledVerifier`, built on
first request and shared by every user (the training rollouts and the math
eval suites use one worker pool). ``close()`` stops every pool's processes.
"""

from __future__ import annotations

import dataclasses

from nemo_gdro.rewards.pool import PooledVerifier
from nemo_gdro.rewards.registry import RewardConfig

__all__ = ["ANSWER_TYPES", "VerifierSet"]

ANSWER_TYPES = ("math", "choice")


class VerifierSet:
    """Verifiers keyed by answer type; owns their worker pools.

    Args:
        config: the math verifier's settings (the ``reward`` section's verifier part).
        choice_verifier: registry name of the multiple-choice verifier.
    """

    def __init__(self, config: RewardConfig, choice_verifier: str = "gpqa_choice") -> None:
        self.config = config
        # Validated now (unknown name -> error naming the key), built only when a task asks for it.
        self._configs = {
            "math": config,
            "choice": _replace(config, "reward.choice_verifier", verifier=choice_verifier, options={}),
        }
        self._built: dict[str, PooledVerifier] = {}
        self._closed = False

    def for_answer_type(self, kind: str) -> PooledVerifier:
        """The verifier of answer type ``kind`` (``math`` | ``choice``), built on first use."""
        if kind not in self._configs:
            raise ValueError(f"no verifier for answer type {kind!r}; known answer types: {', '.join(ANSWER_TYPES)}")
        if self._closed:
            raise RuntimeError("VerifierSet.for_answer_type called after close()")
        if kind not in self._built:
            self._built[kind] = PooledVerifier(self._configs[kind])
        return self._built[kind]

    @property
    def built(self) -> dict[str, PooledVerifier]:
        """Answer type -> the verifiers built so far."""
        return dict(self._built)

    def worker_pids(self) -> list[int]:
        """Pids of every live server and worker process (for tests and diagnostics)."""
        pids: list[int] = []
        for v in self._built.values():
            if v.server_pid is not None:
                pids.append(v.server_pid)
            pids.extend(v.worker_pids)
        return pids

    def close(self) -> None:
        """Stop every pool's processes; idempotent."""
        self._closed = True
        errors = []
        for v in self._built.values():
            try:
                v.close()
            except Exception as e:  # noqa: BLE001 - close the others, then report
                errors.append(e)
        if errors:
            raise errors[0]

    def __enter__(self) -> VerifierSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _replace(config: RewardConfig, key: str, **changes: object) -> RewardConfig:
    try:
        return dataclasses.replace(config, **changes)
    except ValueError as e:
        msg = str(e).replace("reward.verifier", key)
        raise ValueError(msg) from None
