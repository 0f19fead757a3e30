r"""Verifiers that turn a response into a reward, and the worker pool that runs them safely.

- :mod:`~nemo_gdro.rewards.base`: ``Verifier`` (``verify_batch -> VerifyResult``,
  ``score_batch -> float32 [R]``, ``reward_range``), the cheap ``prepare`` /
  slow ``check`` split.
- :mod:`~nemo_gdro.rewards.math`: ``DapoMathVerifier`` (``dapo_math``: DAPO's
  "Answer:" extraction, ``\boxed{}`` fallback, string pre-check, math-verify
  equivalence) and ``MathVerifier`` (``math_verify``).
- :mod:`~nemo_gdro.rewards.choice`: ``ChoiceVerifier`` (``gpqa_choice``).
- :mod:`~nemo_gdro.rewards.arithmetic`: ``ArithmeticVerifier`` (``arithmetic``).
- :mod:`~nemo_gdro.rewards.pool`: ``PooledVerifier``, worker processes with a
  hard per-item timeout; :mod:`~nemo_gdro.rewards.registry`: names ->
  classes, ``RewardConfig`` (the ``reward`` section), ``build_reward``.
- :mod:`~nemo_gdro.rewards.shaping`: DAPO overlong shaping, truncation masks.
"""
