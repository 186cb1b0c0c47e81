"""``crnet-train CONFIG.yaml [--set section.key=value ...]``: CR-Net pre-training on Megatron-Core.

Runs under ``torchrun`` for TP/PP/DP (gloo on CPU, NCCL on GPU); alone it is one process.
See ``examples/configs/`` for configs and ``crnet-train --list-keys`` for every key.
Bad input (config, data, tokenizer, checkpoint) ends the run with one line naming the file or
key; set ``CRNET_TRACEBACK=1`` for the full traceback.
"""

from __future__ import annotations

import argparse
import os
from typing import List, Optional

from crnet_megatron.cli.common import run_cli


def main(argv: Optional[List[str]] = None) -> None:
    from crnet_megatron.training.faults import clean_exit_on_sigterm

    with clean_exit_on_sigterm():  # from the first line: SIGTERM while importing exits 143
        _main(argv)


def _main(argv: Optional[List[str]]) -> None:
    parser = argparse.ArgumentParser(prog="crnet-train", description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", help="YAML config (see examples/configs/; every "
                                                    "key and default: --list-keys)")
    parser.add_argument("--list-keys", action="store_true",
                        help="print every config key (default, type, allowed values, what it "
                             "does) as a Markdown table, and exit")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value (repeatable), e.g. optimizer.lr=3e-3")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the config and print this rank's launch (rank, world, TP x "
                             "PP x DP, master, config) without starting anything")
    args = parser.parse_args(argv)
    if args.list_keys:
        from crnet_megatron.config.keys import key_table

        print(key_table(), end="")
        return
    if args.config is None:
        parser.error("the following arguments are required: config")
    run_cli("crnet-train", lambda: _train(args))


def _train(args) -> None:
    from crnet_megatron.config.run_config import load_run_config
    from crnet_megatron.parallel.launch import world_size
    from crnet_megatron.training.preflight import check_inputs, check_layout

    cfg = load_run_config(args.config, args.set)
    check_layout(cfg, world_size())
    check_inputs(cfg)
    if args.dry_run:
        return dry_run(cfg, args)
    from crnet_megatron.training.trainer import run

    run(cfg)


def dry_run(cfg, args) -> None:
    """One line per rank: what this process would run as, so a launch script can be checked."""
    from crnet_megatron.parallel.launch import layout_from_env
    from crnet_megatron.training.preflight import (
        sequence_parallel_warning,
        validate_batch,
    )

    p = cfg["parallel"]
    lay = layout_from_env(p["tensor_model_parallel_size"], p["pipeline_model_parallel_size"])
    micro = validate_batch(cfg, lay["dp"])
    warning = sequence_parallel_warning(cfg)
    if warning and lay["rank"] == 0:
        print(warning, flush=True)
    env = " ".join(f"{k}={os.environ[k]}" for k in sorted(os.environ)
                   if k.startswith(("CUDA_DEVICE_MAX", "NCCL_", "OMP_NUM", "SRUN_CPUS")))
    sets = " ".join(f"--set {s}" for s in args.set)
    print(f"dry-run rank={lay['rank']} local_rank={lay['local_rank']} world={lay['world']} "
          f"tp={lay['tp']} pp={lay['pp']} vpp={p['virtual_pipeline_model_parallel_size'] or 1} "
          f"dp={lay['dp']} micro_batches={micro} "
          f"master={lay['master']} config={args.config} {env} "
          f"cmd=python -m crnet_megatron.cli.train {args.config} {sets}".rstrip(), flush=True)


if __name__ == "__main__":
    main()
