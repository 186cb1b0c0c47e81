"""``crnet-compare CONFIG --out DIR``: train CR-Net and the paper's baselines (lowrank, dense)
on one config and compare them.

    crnet-compare examples/configs/tiny_cpu.yaml --out runs/compare \\
        [--variants crnet lowrank dense] [--set schedule.train_iters=200] [--json out.json]

Same data, schedule, seed, parallel layout and counting; only ``model.variant`` changes.
Each variant trains in its own process (``crnet-train``) into OUT/VARIANT, with one progress line
per variant; the table gives the parameters and training FLOPs per token from the counting
module, the final training loss and the validation loss/perplexity of the run's own final eval
(the same validation batches for every variant); ``OUT/loss_curves.png`` draws the variants'
curves. A used ``--out`` is refused (its runs would be resumed, not redone) unless
``--overwrite`` clears it first.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

from crnet_megatron.cli.common import run_cli

VARIANTS = ("crnet", "lowrank", "dense")


def _rows(path):
    return [json.loads(line) for line in open(path) if line.strip()]


def _last(rows, split):
    return [r for r in rows if r.get("split") == split][-1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="crnet-compare", description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument("--out", required=True, help="a new or empty directory (one run per variant)")
    p.add_argument("--overwrite", action="store_true", help="clear a used --out first")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--json")
    args = p.parse_args(argv)
    return run_cli("crnet-compare", lambda: _compare(args))


def _check_out(args) -> None:
    if os.path.exists(args.out) and (not os.path.isdir(args.out) or os.listdir(args.out)):
        if not args.overwrite:
            raise FileExistsError(f"--out {args.out} is not empty: its runs would be resumed, not "
                                  "trained anew with these settings; choose a new directory or "
                                  "pass --overwrite to clear it")
        shutil.rmtree(args.out) if os.path.isdir(args.out) else os.remove(args.out)


def _compare(args) -> int:
    from crnet_megatron.analysis.counting import (
        ModelShape,
        count_params,
        flops_per_token,
    )
    from crnet_megatron.config.megatron_configs import to_crnet_config
    from crnet_megatron.config.run_config import load_run_config, padded_vocab
    from crnet_megatron.parallel.environment import announce

    for variant in args.variants:  # every variant's config is valid before anything trains
        load_run_config(args.config, args.set + [f"model.variant={variant}"])
    _check_out(args)
    announce()
    rows, curves = [], {}
    for i, variant in enumerate(args.variants, 1):
        save = os.path.join(args.out, variant)
        sets = args.set + [f"model.variant={variant}", f"checkpoint.save={save}",
                           "logging.progress_bar=false", "logging.plot=false"]
        cfg = load_run_config(args.config, sets)
        config = to_crnet_config(cfg)
        print(f"[{i}/{len(args.variants)}] {variant}: training {cfg['schedule']['train_iters']} "
              f"iterations into {save} ...", flush=True)
        start = time.perf_counter()
        cmd = [sys.executable, "-m", "crnet_megatron.cli.train", args.config]
        subprocess.run(cmd + [a for s in sets for a in ("--set", s)], check=True,
                       stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - start
        vocab = json.load(open(os.path.join(save, "tokenizer.json")))["model"]["vocab"]
        shape = ModelShape.from_config(config, padded_vocab(
            len(vocab), cfg["parallel"]["tensor_model_parallel_size"]))
        metrics = _rows(os.path.join(save, "metrics.jsonl"))
        curves[variant] = metrics
        valid, train = _last(metrics, "valid"), _last(metrics, "train")
        print(f"[{i}/{len(args.variants)}] {variant}: done in {seconds:.0f} s, valid loss "
              f"{valid['loss']:.4f}", flush=True)
        rows.append(dict(variant=variant, params=count_params(shape, config.crnet_layer_ranks)["total"],
                         train_flops_per_token=flops_per_token(
                             shape, config.crnet_layer_ranks, cfg["model"]["seq_length"])["training"],
                         iterations=valid["iteration"], train_loss=train["loss"],
                         valid_loss=valid["loss"], valid_ppl=valid["ppl"], seconds=seconds))
    _table(rows)
    print(f"loss curves: {_plot(curves, os.path.join(args.out, 'loss_curves.png'))}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


def _table(rows) -> None:
    print("| variant | params | train GFLOP/token | iters | train loss | valid loss | valid ppl | s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['params']:,} | {r['train_flops_per_token'] / 1e9:.4f} "
              f"| {r['iterations']} | {r['train_loss']:.4f} | {r['valid_loss']:.4f} "
              f"| {r['valid_ppl']:.2f} | {r['seconds']:.0f} |")


def _plot(curves, path) -> str:
    """Training loss per logged iteration (lines) and validation loss (markers), per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for variant, rows in curves.items():
        train = [r for r in rows if r.get("split") == "train"]
        valid = [r for r in rows if r.get("split") == "valid"]
        line, = ax.plot([r["iteration"] for r in train], [r["loss"] for r in train],
                        label=f"{variant} (train)")
        ax.plot([r["iteration"] for r in valid], [r["loss"] for r in valid], "o",
                color=line.get_color(), label=f"{variant} (valid)")
    ax.set(xlabel="iteration", ylabel="loss", title="crnet-compare")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(main())
