"""Training: the plan, the loop, data-parallel ranks, checkpoints, metrics, and `build`."""
