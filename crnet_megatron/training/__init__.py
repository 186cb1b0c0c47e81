"""The production training driver: config, data, optimizer, checkpoints, metrics, loop."""
