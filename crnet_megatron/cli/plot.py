"""``crnet-plot METRICS.jsonl [--out curves.png]``: loss / perplexity curves of a run to PNG."""

from __future__ import annotations

import argparse
import sys

from crnet_megatron.cli.common import run_cli


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="crnet-plot", description=__doc__.splitlines()[0])
    p.add_argument("jsonl", help="a run's metrics.jsonl")
    p.add_argument("--out", help="PNG path (default: next to the metrics)")
    args = p.parse_args(argv)

    def _plot() -> int:
        from crnet_megatron.parallel.environment import announce
        from crnet_megatron.training.plot import plot_metrics

        announce()
        print(plot_metrics(args.jsonl, args.out))
        return 0

    return run_cli("crnet-plot", _plot)


if __name__ == "__main__":
    sys.exit(main())
