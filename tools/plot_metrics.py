"""Draw loss / perplexity curves from a run's metrics.jsonl to PNG.

    python tools/plot_metrics.py runs/tiny/metrics.jsonl [--out curves.png]
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from crnet_megatron.training.plot import plot_metrics  # noqa: E402

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("jsonl")
    p.add_argument("--out")
    a = p.parse_args()
    print(plot_metrics(a.jsonl, a.out))
