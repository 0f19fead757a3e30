"""Prompt datasets with stable ids, tokenizers, and the synthetic arithmetic generator."""
