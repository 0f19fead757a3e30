"""Megatron GPT builders (tiny, Qwen3 presets), model sources, and the HF <-> Megatron weight mapping."""
