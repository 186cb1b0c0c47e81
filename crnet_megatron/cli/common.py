"""One error line for every command: bad input (a config, checkpoint, tokenizer, data file or
directory) ends a command with ``PROG: error: ...`` naming the file or key, exit status 2;
``CRNET_TRACEBACK=1`` shows the traceback instead."""

from __future__ import annotations

import os
import sys
import warnings
from typing import Callable


def run_cli(prog: str, fn: Callable[[], int]) -> int:
    warnings.filterwarnings("ignore")  # megatron-core's import-time notes about Apex/TE
    from crnet_megatron.training.checkpointing import CheckpointSaveError

    try:
        return fn() or 0
    except (ValueError, OSError, CheckpointSaveError) as e:
        if os.environ.get("CRNET_TRACEBACK"):
            raise
        print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
