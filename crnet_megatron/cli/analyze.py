"""Rank advisor: the paper's Figure 2 analysis on a checkpoint or export, and a rank schedule.

    crnet-analyze runs/tiny_cpu --data docs.jsonl --out analysis/ \
        [--tokens 2048] [--ranks 8,16,32,64] [--target-error 0.5] [--budget-rank-sum N]

Writes ``residuals.csv`` (layer, projection, r, direct and cross-layer errors, betas, stable
ranks), ``heatmap.png`` (layers x projections: direct and cross-layer error at --heat-rank) and
``suggested_ranks.yaml`` (``model.crnet_rank`` as a per-layer list, usable as is), and prints
the list. The budget defaults to the model's own low-rank parameters (the sum of its CR-Net
ranks), or for a dense model to rank hidden/4 in layers 2..L.
"""

import argparse
import csv
import os
import sys

from crnet_megatron.cli.common import run_cli


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="crnet-analyze", description=__doc__.splitlines()[0])
    p.add_argument("model", help="export directory, run directory or iter_N checkpoint")
    p.add_argument("--data", required=True, help=".jsonl, text file, or indexed-dataset prefix")
    p.add_argument("--out", required=True, help="output directory (created)")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--ranks", default="", help="comma-separated sweep (default: powers of 2)")
    p.add_argument("--heat-rank", type=int, default=0, help="rank shown in the heat map")
    p.add_argument("--target-error", type=float, default=0.5,
                   help="cross-layer error each layer's needed rank must reach")
    p.add_argument("--budget-rank-sum", type=int, default=0,
                   help="sum of the suggested ranks (= the low-rank parameter budget / (sum of "
                        "h_in + h_out over the 7 projections))")
    p.add_argument("--multiple", type=int, default=8, help="ranks are multiples of this (GEMM-friendly widths; TP needs none)")
    p.add_argument("--dense-layers", type=int, default=1)
    p.add_argument("--tokenizer")
    args = p.parse_args(argv)
    return run_cli("crnet-analyze", lambda: _main(args))


def _main(args) -> int:
    from crnet_megatron.analysis.residuals import POSITIONS, analyze_model
    from crnet_megatron.export.generation import load_for_generation

    if not 0 < args.target_error < 1 or args.tokens < 2 or args.multiple < 1:
        raise ValueError("--target-error must be in (0, 1), --tokens >= 2, --multiple >= 1")
    model, tok, eos = load_for_generation(args.model, args.tokenizer)
    acts, n = _capture(model, tok, eos, args)
    smallest = min(min(a.shape[-1] for a in layer.values()) for layer in acts)
    sweep = ([int(x) for x in args.ranks.split(",") if x] if args.ranks else
             [r for r in (2 ** k for k in range(1, 16)) if r < min(smallest, n)])
    rows = analyze_model(acts, sweep, args.target_error)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "residuals.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    c = model.config
    heat = args.heat_rank or informative_rank(rows, sweep)
    if heat not in sweep:
        heat = min(sweep, key=lambda r: abs(r - heat))
    _heatmap(rows, heat, len(acts), POSITIONS, os.path.join(args.out, "heatmap.png"))
    need, ranks, total = _suggest(args, c, rows, min(smallest - 1, c.hidden_size - 1))
    print(f"{'layer':>5} " + " ".join(f"{p:>9}" for p in POSITIONS) + "   (cross-layer / "
          f"direct error at r = {heat})")
    for layer in range(2, len(acts) + 1):
        cells = {r["projection"]: r for r in rows if r["layer"] == layer and r["r"] == heat}
        print(f"{layer:>5} " + " ".join(
            f"{cells[p]['err_cross']:.2f}/{cells[p]['err_direct']:.2f}".rjust(9) for p in POSITIONS))
    print(f"needed rank per layer (mean over projections, error <= {args.target_error}): "
          + ", ".join(f"{x:.0f}" for x in need))
    print(f"suggested ranks: the needed ranks (sum {sum(need):.0f}) scaled by {total} / "
          f"{sum(need):.0f} = {total / max(sum(need), 1e-9):.2f} to the rank-sum budget {total} "
          f"(--budget-rank-sum; default: the model's own), each rounded to a multiple of "
          f"{args.multiple} (--multiple), at least {args.multiple}")
    print(f"model.crnet_rank: {ranks}   (sum {sum(ranks)}, budget {total}; "
          f"{os.path.join(args.out, 'suggested_ranks.yaml')})")
    return 0


def informative_rank(rows, sweep, floor: float = 0.05) -> int:
    """The heat map's default rank: the largest swept rank whose mean cross-layer error is still
    at least ``floor`` (at a CR-Net model's own rank every error vanishes: its chains are
    exactly rank r), else the middle of the sweep."""
    mean = {r: sum(x["err_cross"] for x in rows if x["r"] == r)
            / max(1, sum(1 for x in rows if x["r"] == r)) for r in sweep}
    informative = [r for r in sweep if mean[r] >= floor]
    return max(informative) if informative else sweep[len(sweep) // 2]


def _capture(model, tok, eos, args):
    """Each layer's projection outputs on ``--tokens`` tokens of ``--data`` (whole sequences)."""
    import torch

    from crnet_megatron.analysis.residuals import capture_projection_outputs
    from crnet_megatron.data.token_windows import token_stream

    seq = model.config.max_position_embeddings

    class _Tok:  # what token_stream needs
        vocab_size, eod = tok.get_vocab_size(), eos

        @staticmethod
        def tokenize(text):
            return tok.encode(text).ids

    stream = token_stream(args.data, _Tok, limit=args.tokens)
    n = (min(len(stream), args.tokens) // seq) * seq
    if n < seq:
        raise ValueError(f"--data {args.data} has {len(stream)} tokens, fewer than one "
                         f"sequence of {seq}")
    ids = torch.as_tensor(stream[:n], dtype=torch.long).view(-1, seq)
    return capture_projection_outputs(model.float(), ids), n


def _suggest(args, c, rows, max_rank):
    """(needed rank per CR-Net layer, suggested ranks for the budget, the budget), written to
    ``suggested_ranks.yaml``."""
    import yaml

    from crnet_megatron.analysis.residuals import POSITIONS, suggest_ranks

    model_ranks = [r for r in c.crnet_layer_ranks if r is not None]
    dense = len(c.crnet_layer_ranks) - len(model_ranks) if model_ranks else args.dense_layers
    layers = list(range(dense + 1, c.num_hidden_layers + 1))
    needed = {}
    for row in rows:
        needed.setdefault(row["layer"], {})[row["projection"]] = row["needed_rank"]
    need = [sum(needed[layer].values()) / len(POSITIONS) for layer in layers]
    total = args.budget_rank_sum or (sum(model_ranks) if model_ranks
                                     else (c.hidden_size // 4) * len(layers))
    ranks = suggest_ranks(need, total, args.multiple, max_rank)
    with open(os.path.join(args.out, "suggested_ranks.yaml"), "w") as f:
        f.write(f"# from {args.model}: target cross-layer error {args.target_error}, rank sum "
                f"budget {total}, layers {layers[0]}..{layers[-1]}\n")
        yaml.safe_dump({"model": {"crnet_rank": ranks, "crnet_rank_schedule": "uniform",
                                  "crnet_dense_layers": dense}}, f, default_flow_style=None)
    return need, ranks, total


def _heatmap(rows, r, num_layers, positions, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    grids = {k: np.full((num_layers - 1, len(positions)), np.nan) for k in ("err_direct", "err_cross")}
    for row in rows:
        if row["r"] == r:
            for k in grids:
                grids[k][row["layer"] - 2, positions.index(row["projection"])] = row[k]
    fig, axes = plt.subplots(1, 2, figsize=(10, 1.2 + 0.35 * num_layers), sharey=True)
    for ax, (key, title) in zip(axes, (("err_direct", "direct LR_r(Y_l)"),
                                       ("err_cross", "cross-layer b Y_{l-1} + LR_r(.)"))):
        im = ax.imshow(grids[key], vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(positions)), positions)
        ax.set_yticks(range(num_layers - 1), [str(i) for i in range(2, num_layers + 1)])
        ax.set_title(f"{title}, r = {r}", fontsize=9)
        for (i, j), v in np.ndenumerate(grids[key]):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w")
    axes[0].set_ylabel("layer")
    fig.colorbar(im, ax=axes, label="relative error")
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
