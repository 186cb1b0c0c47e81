"""Checkpoints: saving and loading, which one to resume from, integrity, reading without unpickling, the run-directory rules."""
