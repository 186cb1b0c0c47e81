"""``crnet-train CONFIG.yaml [--set section.key=value ...]``: CR-Net pre-training on Megatron-Core.

Runs under ``torchrun`` for TP/PP/DP (gloo on CPU, NCCL on GPU); alone it is one process.
See ``examples/configs/`` for configs and ``crnet_megatron/training/config.py`` for every key.
Bad input (config, data, tokenizer, checkpoint) ends the run with one line naming the file or
key; set ``CRNET_TRACEBACK=1`` for the full traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="crnet-train", description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", help="YAML config (see examples/configs/)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value (repeatable), e.g. optimizer.lr=3e-3")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")  # megatron-core's import-time notes about Apex/TE
    from .training.checkpointing import CheckpointSaveError
    from .training.config import load_run_config

    try:
        cfg = load_run_config(args.config, args.set)
        from .training.loop import run

        run(cfg)
    except (ValueError, OSError, CheckpointSaveError) as e:
        if os.environ.get("CRNET_TRACEBACK"):
            raise
        print(f"crnet-train: error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
