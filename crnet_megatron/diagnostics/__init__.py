"""What a user runs to check an install or a machine: the self-test's checks, the communication counter and probe, the saved-activation and host-sync profilers."""
