"""The training driver: run config, datasets, the step, the trainer, checkpoints, metrics."""
