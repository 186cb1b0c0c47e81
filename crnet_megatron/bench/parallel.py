"""Side-by-side step time of one CR-Net model under several parallel layouts (torchrun, gloo
on CPU or NCCL on GPU). Same model, same global batch per step (tiny_cpu.yaml by default; tokens per step from its seq_length);
throughput is read from the second half of each run. Prints a table, writes JSON.

    crnet-bench parallel --iters 30 --json bench_parallel.json
"""

from __future__ import annotations

from crnet_megatron.bench import runner
from crnet_megatron.bench.launch import ROOT, run_training

LAYOUTS = {
    "tp1": (1, [], 1),
    "tp2": (2, ["parallel.tensor_model_parallel_size=2"], 1),
    "tp2-sp": (2, ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"], 1),
    "pp2": (2, ["parallel.pipeline_model_parallel_size=2"], 1),
    "dp2": (2, [], 1),
}


def main(argv=None):
    p = runner.parser(__doc__, "parallel")
    p.add_argument("--config", default=str(ROOT / "examples/configs/tiny_cpu.yaml"))
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--microbatches", type=int, default=4)
    p.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    args = p.parse_args(argv)
    from crnet_megatron.config.run_config import load_run_config

    seq = load_run_config(args.config)["model"]["seq_length"]
    rows = []
    for name in args.layouts:
        nproc, sets, _ = LAYOUTS[name]
        mbs = 8  # same global batch everywhere: micro-batches x DP = args.microbatches
        train, valid, _ = run_training(nproc, args.config, [
            f"schedule.micro_batch_size={mbs}",
            f"schedule.global_batch_size={mbs * args.microbatches}", *sets], args.iters)
        tokens = mbs * args.microbatches * seq
        rows.append(dict(layout=name, processes=nproc, step_time_s=tokens / train["tokens_per_s"],
                         tokens_per_s=train["tokens_per_s"], final_loss=valid["loss"]))
    for r in rows:
        r["step_time_ratio"] = r["step_time_s"] / rows[0]["step_time_s"]
    columns = [("layout", "layout", ""), ("processes", "processes", ""),
               ("step s", "step_time_s", ".3f"), (f"vs {rows[0]['layout']}", "step_time_ratio", ".2f"),
               ("tokens/s", "tokens_per_s", ",.0f"), ("final loss", "final_loss", ".4f")]
    title = f"{args.config}: seq {seq}, global batch {8 * args.microbatches}, {args.iters} iterations"
    runner.finish(args, [runner.table(rows, columns, title)], rows=rows, seq_length=seq)


if __name__ == "__main__":
    main()
