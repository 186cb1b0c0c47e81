"""Instruments for tests, benchmarks and the self-test: the oracle, communication counters, the
saved-activation profiler, the TE stand-in, the self-test's checks."""
