"""Helpers that build small real assets (checkpoints, tokenizers) for tests, CI jobs and users."""
