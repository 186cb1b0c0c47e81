"""Weak-scaling benchmark: fixed model and fixed work per process while data parallelism grows
(Megatron's "fixed-model weak scaling"): tokens/s per process, scaling efficiency against the
smallest run, TFLOP/s and MFU from CR-Net's FLOP count, peak memory. Prints a table, writes
JSON and optionally a plot.

Local (one node, torchrun per point):
    crnet-bench weak-scaling --config examples/configs/tiny_cpu.yaml --procs 1 2
Multi-node (one sbatch run per node count, each with checkpoint.save=DIR_N), then collect:
    crnet-bench weak-scaling --collect runs/ws_8/metrics.jsonl runs/ws_16/metrics.jsonl \\
        --collect-procs 8 16
Every run must use the same micro_batch_size and num_microbatches per DP rank
(global_batch_size = micro_batch_size x microbatches x DP), which this tool sets locally.
"""

from __future__ import annotations

from crnet_megatron.bench import runner
from crnet_megatron.bench.launch import ROOT, last, read_metrics, run_training


def _row(procs: int, rec: dict) -> dict:
    return dict(processes=procs, tokens_per_s=rec["tokens_per_s"],
                tokens_per_s_per_proc=rec["tokens_per_s"] / procs,
                tflops_per_proc=rec["tflops_per_device"], mfu=rec.get("mfu"),
                peak_memory_gb=rec.get("peak_memory_gb"))


def main(argv=None):
    p = runner.parser(__doc__, "weak-scaling")
    p.add_argument("--config", default=str(ROOT / "examples/configs/tiny_cpu.yaml"))
    p.add_argument("--procs", nargs="+", type=int, default=[1, 2])
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--microbatches", type=int, default=2)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--set", action="append", default=[], help="extra config override")
    p.add_argument("--collect", nargs="+", help="metrics.jsonl files of finished runs")
    p.add_argument("--collect-procs", nargs="+", type=int)
    p.add_argument("--plot", help="PNG of tokens/s/process and efficiency")
    args = p.parse_args(argv)

    rows = []
    if args.collect:
        if not args.collect_procs or len(args.collect_procs) != len(args.collect):
            p.error("--collect-procs needs one process count per --collect file")
        for procs, path in zip(args.collect_procs, args.collect):
            rows.append(_row(procs, last(read_metrics(path), "train")))
    else:
        for procs in args.procs:
            gbs = args.micro_batch_size * args.microbatches * procs
            train, _, _ = run_training(procs, args.config, [
                f"schedule.micro_batch_size={args.micro_batch_size}",
                f"schedule.global_batch_size={gbs}", *args.set], args.iters)
            rows.append(_row(procs, train))
    base = rows[0]["tokens_per_s_per_proc"]
    for r in rows:
        r["efficiency"] = r["tokens_per_s_per_proc"] / base
    columns = [("processes", "processes", ""), ("tokens/s", "tokens_per_s", ",.0f"),
               ("tokens/s/process", "tokens_per_s_per_proc", ",.0f"),
               ("efficiency", "efficiency", ".2f"), ("TFLOP/s/process", "tflops_per_proc", ".4f"),
               ("MFU", "mfu", ".1%"), ("peak GB", "peak_memory_gb", ".2f")]
    runner.finish(args, [runner.table(rows, columns)], rows=rows)
    if args.plot:
        _plot(rows, args.plot)


def _plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    n = [r["processes"] for r in rows]
    ax[0].plot(n, [r["tokens_per_s_per_proc"] for r in rows], "o-")
    ax[0].set(xlabel="processes", ylabel="tokens/s per process", xscale="log")
    ax[1].plot(n, [r["efficiency"] for r in rows], "o-")
    ax[1].axhline(1.0, color="grey", lw=0.8)
    ax[1].set(xlabel="processes", ylabel="weak-scaling efficiency", xscale="log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
