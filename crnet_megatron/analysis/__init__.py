"""Post-training analyses (the rank advisor)."""
