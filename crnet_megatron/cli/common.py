"""One error line for every command: bad input (a config, checkpoint, tokenizer, data file or
directory) ends a command with ``PROG: error: ...`` naming the file or key, exit status 2;
``CRNET_TRACEBACK=1`` shows the traceback instead."""

from __future__ import annotations

import os
import sys
import warnings
from typing import Callable, Tuple


def _user_errors() -> Tuple[type, ...]:
    """Errors that mean bad input. A failed checkpoint save is one too; its class is looked up
    only if checkpointing was imported (a command that never saved cannot have raised it, and
    this keeps the light commands free of megatron-core)."""
    checkpointing = sys.modules.get("crnet_megatron.checkpoint.checkpointing")
    return (ValueError, OSError) + ((checkpointing.CheckpointSaveError,) if checkpointing else ())


def run_cli(prog: str, fn: Callable[[], int]) -> int:
    warnings.filterwarnings("ignore")  # megatron-core's import-time notes about Apex/TE
    try:
        return fn() or 0
    except Exception as e:  # noqa: BLE001 - sorted below: bad input gets one line
        if not isinstance(e, _user_errors()) or os.environ.get("CRNET_TRACEBACK"):
            raise
        print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except BaseException as e:  # noqa: BLE001 - a Rust library's panic (tokenizers)
        if type(e).__name__ != "PanicException" or os.environ.get("CRNET_TRACEBACK"):
            raise
        first = (str(e).strip().splitlines() or ["no message"])[0][:300]
        print(f"{prog}: error: the tokenizer library failed on this input ({first}); check "
              "the tokenizer's regular expressions (data.tokenizer)", file=sys.stderr,
              flush=True)
        raise SystemExit(2) from None
