"""Launch ``crnet-train`` under torchrun for benchmarks and read back its metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[2]  # the repository (examples/configs)


def run_training(nproc: int, config: str, sets: Sequence[str], iters: int,
                 timeout: int = 3600) -> Tuple[Dict, Dict, List[Dict]]:
    """Train ``iters`` steps on ``nproc`` local processes; returns the last train record (second
    half of the run: warmed up), the last validation record, and every record."""
    with tempfile.TemporaryDirectory() as d:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", "-m", "crnet_megatron.cli.train", config,
               "--set", f"schedule.train_iters={iters}", "--set", f"checkpoint.save={d}",
               "--set", "checkpoint.save_interval=null",
               "--set", f"logging.log_interval={max(1, iters // 2)}",
               "--set", f"eval.eval_interval={iters}", "--set", "logging.plot=false",
               "--set", "logging.progress_bar=false"]
        for s in sets:
            cmd += ["--set", s]
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=timeout)
        records = read_metrics(os.path.join(d, "metrics.jsonl"))
    return last(records, "train"), last(records, "valid"), records


def read_metrics(path: str) -> List[Dict]:
    return [json.loads(line) for line in open(path) if line.strip()]


def last(records: List[Dict], split: str) -> Dict:
    return [r for r in records if r.get("split") == split][-1]


