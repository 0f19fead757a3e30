"""The ragged rollout batch and the rollout engines (chosen by ``rollout.engine``)."""
