"""The Megatron trainer: typed config, composition root, the RL step, phases, checkpoints, metrics, plots."""
