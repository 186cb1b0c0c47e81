"""``crnet-train CONFIG.yaml [--set section.key=value ...]``: CR-Net pre-training on Megatron-Core.

Runs under ``torchrun`` for TP/PP/DP (gloo on CPU, NCCL on GPU); alone it is one process.
See ``examples/configs/`` for configs and ``crnet_megatron/training/config.py`` for every key.
"""

from __future__ import annotations

import argparse
from typing import List, Optional

from .training.config import load_run_config


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="crnet-train", description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", help="YAML config (see examples/configs/)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value (repeatable), e.g. optimizer.lr=3e-3")
    args = parser.parse_args(argv)
    cfg = load_run_config(args.config, args.set)
    from .training.loop import run

    run(cfg)


if __name__ == "__main__":
    main()
