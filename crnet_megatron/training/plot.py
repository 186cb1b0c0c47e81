"""Loss and perplexity curves (train and validation) from a metrics JSONL file, to PNG."""

from __future__ import annotations

import os
from typing import Optional

from crnet_megatron.data.safe_files import (
    bounded_lines,
    claim,
    loads_json,
    replace_into,
    temporary_path,
)
from crnet_megatron.training.metrics import MAX_ROW_BYTES


def plot_metrics(jsonl_path: str, out_path: Optional[str] = None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    with open(jsonl_path, "rb") as f:
        for line in bounded_lines(f, MAX_ROW_BYTES):
            try:
                row = loads_json(line, "metrics row") if line and line.strip() else None
            except ValueError:
                row = None  # not a metrics row: not plotted
            if isinstance(row, dict) and isinstance(row.get("iteration"), int):
                rows.append(row)
    if not rows:
        raise ValueError(f"{jsonl_path} has no metrics")
    out_path = out_path or os.path.splitext(jsonl_path)[0] + ".png"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for split, style in (("train", "-"), ("valid", "o-")):
        pts = [r for r in rows if r.get("split") == split]
        if pts:
            it = [r["iteration"] for r in pts]
            axes[0].plot(it, [r["loss"] for r in pts], style, label=split)
            axes[1].plot(it, [r["ppl"] for r in pts], style, label=split)
    axes[0].set(xlabel="iteration", ylabel="loss", title="loss")
    axes[1].set(xlabel="iteration", ylabel="perplexity", title="perplexity", yscale="log")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    tmp = temporary_path(out_path)
    claim(tmp)  # a fresh name, created exclusively: matplotlib never writes through a link
    try:
        fig.savefig(tmp, dpi=110, format="png")
        replace_into(tmp, out_path, "loss plot")
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out_path
