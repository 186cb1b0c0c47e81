"""Parameter and FLOP calculator: CR-Net vs its lowrank and dense baselines, the paper's shapes.

    crnet-params --size 1b --rank 448 512 --seq-len 256 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from crnet_megatron.analysis.counting import LLAMA_SHAPES, count_params, summary


def main(argv=None):
    p = argparse.ArgumentParser(prog="crnet-params", description=__doc__.splitlines()[0])
    p.add_argument("--size", nargs="+", default=list(LLAMA_SHAPES), choices=list(LLAMA_SHAPES))
    p.add_argument("--rank", nargs="+", type=int, default=[128, 256, 448, 512])
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--json", help="write the rows as JSON here")
    args = p.parse_args(argv)
    from crnet_megatron.parallel.environment import announce

    announce()
    rows = []
    print(f"{'size':>5} {'rank':>5} {'params':>10} {'lowrank':>10} {'dense':>10} {'ratio':>6} "
          f"{'train GFLOP/tok':>16} {'linear FLOP ratio':>18}")
    for size in args.size:
        shape = LLAMA_SHAPES[size]
        for r in args.rank:
            if r >= shape.hidden:
                continue
            s = summary(shape, r, args.seq_len)
            lowrank = count_params(shape.as_variant("lowrank"), r)["total"]
            rows.append(dict(size=size, rank=r, lowrank_params=lowrank, **s))
            print(f"{size:>5} {r:>5} {s['params'] / 1e6:>9.1f}M {lowrank / 1e6:>9.1f}M "
                  f"{s['dense_params'] / 1e6:>9.1f}M "
                  f"{s['param_ratio']:>6.3f} {s['training_flops_per_token'] / 1e9:>16.3f} "
                  f"{s['linear_flop_ratio']:>18.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
