"""The run configuration: every YAML key, its checks (no torch), and the Megatron-Core configs made from it."""
