"""Filled in by later issues (see README roadmap)."""
