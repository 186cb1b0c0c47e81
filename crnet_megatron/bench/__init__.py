"""The benchmarks behind ``crnet-bench``, on one runner (``runner.py``)."""
