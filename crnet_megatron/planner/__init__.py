"""``crnet-plan``: memory fit and step-time model for a run, before renting the GPUs."""
