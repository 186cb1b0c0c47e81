"""Train CR-Net and the paper's baselines (lowrank, dense) on one config and compare them.

    crnet-compare examples/configs/tiny_cpu.yaml --out runs/compare \
        [--variants crnet lowrank dense] [--set schedule.train_iters=200] [--json out.json]

Same data, schedule, seed, parallel layout and counting; only ``model.variant`` changes.
Each variant trains in its own process (``crnet-train``) into OUT/VARIANT; the table gives the
parameters and training FLOPs per token from the counting module, the final training loss and
the validation loss/perplexity of the run's own final eval (the same validation batches for
every variant).
"""

import argparse
import json
import os
import subprocess
import sys
import time


def _last(path, split):
    rows = [json.loads(line) for line in open(path) if line.strip()]
    return [r for r in rows if r.get("split") == split][-1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="crnet-compare", description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument("--out", required=True)
    p.add_argument("--variants", nargs="+", default=["crnet", "lowrank", "dense"],
                   choices=["crnet", "lowrank", "dense"])
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--json")
    args = p.parse_args(argv)

    from crnet_megatron.analysis.counting import (
        ModelShape,
        count_params,
        flops_per_token,
    )
    from crnet_megatron.parallel.environment import announce
    from crnet_megatron.training.run_config import (
        load_run_config,
        padded_vocab,
        to_crnet_config,
    )

    announce()
    rows = []
    for variant in args.variants:
        save = os.path.join(args.out, variant)
        sets = args.set + [f"model.variant={variant}", f"checkpoint.save={save}",
                           "logging.progress_bar=false", "logging.plot=false"]
        cfg = load_run_config(args.config, sets)
        config = to_crnet_config(cfg)
        start = time.perf_counter()
        cmd = [sys.executable, "-m", "crnet_megatron.cli.train", args.config]
        subprocess.run(cmd + [a for s in sets for a in ("--set", s)], check=True,
                       stdout=subprocess.DEVNULL)
        vocab = json.load(open(os.path.join(save, "tokenizer.json")))["model"]["vocab"]
        shape = ModelShape.from_config(config, padded_vocab(
            len(vocab), cfg["parallel"]["tensor_model_parallel_size"]))
        metrics = os.path.join(save, "metrics.jsonl")
        valid, train = _last(metrics, "valid"), _last(metrics, "train")
        rows.append(dict(variant=variant, params=count_params(shape, config.crnet_layer_ranks)["total"],
                         train_flops_per_token=flops_per_token(
                             shape, config.crnet_layer_ranks, cfg["model"]["seq_length"])["training"],
                         iterations=valid["iteration"], train_loss=train["loss"],
                         valid_loss=valid["loss"], valid_ppl=valid["ppl"],
                         seconds=time.perf_counter() - start))
    print("| variant | params | train GFLOP/token | iters | train loss | valid loss | valid ppl | s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['params']:,} | {r['train_flops_per_token'] / 1e9:.4f} "
              f"| {r['iterations']} | {r['train_loss']:.4f} | {r['valid_loss']:.4f} "
              f"| {r['valid_ppl']:.2f} | {r['seconds']:.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
