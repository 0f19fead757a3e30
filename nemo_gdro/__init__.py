"""nemo_gdro: GDRO, DynaMO and R2VPO for GRPO-style RL post-training."""

__version__ = "0.1.0"
