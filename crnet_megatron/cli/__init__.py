"""Every console script; bad input ends each with one line (``common.run_cli``)."""
