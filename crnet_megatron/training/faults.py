"""Process hygiene: a killed trainer leaves no helper processes behind, and SIGTERM/SIGINT ask
for a save and a clean stop (``StopSignals``).

Megatron-Core's checkpoint writer forks worker processes during a save. If the trainer is
killed (SIGKILL, OOM killer, a node agent) in the middle of a save, those workers would live on
as orphans. ``children_die_with_parent`` asks Linux to SIGKILL every process this trainer forks
as soon as the trainer dies (``PR_SET_PDEATHSIG``); elsewhere it does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
from typing import Optional

_PR_SET_PDEATHSIG = 1
_INSTALLED = False


def _set_pdeathsig():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def children_die_with_parent() -> None:
    """Install once per process: every forked child is killed when this process dies; and a
    worker torchrun started (in a session of its own, out of reach of a signal to the
    launcher's process group) is killed when torchrun dies, as a scheduler's cgroup would."""
    global _INSTALLED
    if _INSTALLED or not sys.platform.startswith("linux"):
        return
    os.register_at_fork(after_in_child=_set_pdeathsig)
    if os.environ.get("TORCHELASTIC_RUN_ID"):  # (torchrun may be PID 1 in a container)
        _set_pdeathsig()
    _INSTALLED = True


class StopSignals:
    """SIGTERM (Slurm's warning before the time limit) and SIGINT request a save and exit."""

    def __init__(self, enabled: bool):
        self.received: Optional[int] = None
        self.previous = {}
        if enabled:
            for sig in (signal.SIGTERM, signal.SIGINT):
                try:
                    self.previous[sig] = signal.signal(sig, self._handle)
                except ValueError:  # not the main thread
                    pass

    def _handle(self, signum, frame):
        self.received = signum

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class _StartupStop(SystemExit):
    """SIGTERM before training started: leave through the ``finally`` blocks, exit 143."""


def _stop_during_startup(signum, frame):
    raise _StartupStop(128 + signum)


@contextlib.contextmanager
def clean_exit_on_sigterm():
    """While a run sets up (process groups, data, model, checkpoint load), SIGTERM ends it
    through its ``finally`` blocks (lock released, groups destroyed) with exit code 143 instead
    of killing it where it stands; ``StopSignals`` takes over once training starts."""
    try:
        previous = signal.signal(signal.SIGTERM, _stop_during_startup)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
