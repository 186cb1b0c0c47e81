"""Side-by-side step time of one CR-Net model under several parallel layouts (torchrun, gloo
on CPU or NCCL on GPU). Same model, same global batch per step (tiny_cpu.yaml, seq 128);
throughput is read from the second half of each run. Prints a table, writes JSON.

    crnet-bench parallel --iters 30 --json bench_parallel.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from crnet_megatron.bench.launch import ROOT, run_training

LAYOUTS = {
    "tp1": (1, [], 1),
    "tp2": (2, ["parallel.tensor_model_parallel_size=2"], 1),
    "tp2-sp": (2, ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"], 1),
    "pp2": (2, ["parallel.pipeline_model_parallel_size=2"], 1),
    "dp2": (2, [], 1),
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "examples/configs/tiny_cpu.yaml"))
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--microbatches", type=int, default=4)
    p.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    p.add_argument("--json")
    args = p.parse_args(argv)
    rows = []
    for name in args.layouts:
        nproc, sets, _ = LAYOUTS[name]
        mbs = 8  # same global batch everywhere: micro-batches x DP = args.microbatches
        train, valid, _ = run_training(nproc, args.config, [
            f"schedule.micro_batch_size={mbs}",
            f"schedule.global_batch_size={mbs * args.microbatches}", *sets], args.iters)
        tokens = mbs * args.microbatches * 128
        rows.append(dict(layout=name, processes=nproc, step_time_s=tokens / train["tokens_per_s"],
                         tokens_per_s=train["tokens_per_s"], final_loss=valid["loss"]))
    base = rows[0]["step_time_s"]
    print(f"{'layout':>8} {'procs':>5} {'step s':>8} {'vs ' + rows[0]['layout']:>8} "
          f"{'tokens/s':>9} {'final loss':>10}")
    for r in rows:
        r["step_time_ratio"] = r["step_time_s"] / base
        print(f"{r['layout']:>8} {r['processes']:>5} {r['step_time_s']:>8.3f} "
              f"{r['step_time_ratio']:>8.2f} {r['tokens_per_s']:>9,.0f} {r['final_loss']:>10.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
