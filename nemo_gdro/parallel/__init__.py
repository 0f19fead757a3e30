"""torch.distributed glue: launch, process groups, backend-device collectives, the row layout of a step,
sharded per-prompt statistics, vocabulary-parallel token statistics, and the Megatron CPU shim."""
