"""The training driver: datasets, what a run checks before it starts, the trainer loop and what it reports, console, metrics, faults."""
