"""Verifiers that turn a response into a reward (exact integers, math-verify)."""
