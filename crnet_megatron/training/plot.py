"""Loss and perplexity curves (train and validation) from a metrics JSONL file, to PNG."""

from __future__ import annotations

import json
import os
from typing import Optional


def plot_metrics(jsonl_path: str, out_path: Optional[str] = None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in open(jsonl_path, encoding="utf-8") if line.strip()]
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
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path
