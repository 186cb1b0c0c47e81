"""``crnet-bench {throughput,recompute,comm,parallel,bubble,weak-scaling,device,planner,costs,checkpoints}``: the
benchmarks, each printing one table and writing JSON (``--json``); ``--reduced`` where offered
runs tiny shapes for CI."""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = {
    "throughput": ("crnet_megatron.bench.throughput",
                   "projection, layer and step time of CR-Net vs dense, interleaved"),
    "recompute": ("crnet_megatron.bench.recompute",
                  "saved activations and step time per recompute mode"),
    "comm": ("crnet_megatron.bench.comm", "TP collective bytes per layer, measured vs formula"),
    "parallel": ("crnet_megatron.bench.parallel", "tokens/s of the driver at TP/PP/DP layouts"),
    "bubble": ("crnet_megatron.bench.bubble",
               "per-stage busy/idle time at PP=4, 1F1B vs interleaved, vs the planner"),
    "weak-scaling": ("crnet_megatron.bench.weak_scaling", "tokens/s per process as DP grows"),
    "device": ("crnet_megatron.bench.device",
               "bf16 step time and peak memory of CR-Net, lowrank and dense (the device kit)"),
    "planner": ("crnet_megatron.bench.planner",
                "planner vs measured activations and published Megatron runs"),
    "costs": ("crnet_megatron.bench.costs",
              "host syncs, TP calls, data reads per step; stall and host RSS per save"),
    "checkpoints": ("crnet_megatron.bench.checkpoints",
                    "save/load/verify costs per rank at 3 sizes x DP 1/2/4; export peak RSS"),
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in BENCHMARKS:
        lines = [f"  {name:<13} {about}" for name, (_, about) in BENCHMARKS.items()]
        print("usage: crnet-bench BENCHMARK [options]   (crnet-bench BENCHMARK --help)\n\n"
              + "\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"crnet-bench: error: unknown benchmark {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    module = importlib.import_module(BENCHMARKS[argv[0]][0])
    rc = module.main(argv[1:])  # some return their rows (for callers); the status is 0 then
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
    sys.exit(main())
