"""Per-step metrics: throughput, TFLOP/s and MFU from CR-Net's own FLOP count (with the dense
equivalent beside it), peak memory; written to a JSONL file and TensorBoard when installed."""

from __future__ import annotations

import json
import math
import os
from typing import Dict, Optional

import torch

from crnet_megatron.planner.hardware import peak_tflops_of


def detect_peak_tflops(configured: Optional[float]) -> Optional[float]:
    """The configured peak, else this GPU's dense BF16 peak (no 2:4 sparsity, as Megatron
    reports MFU; ``planner.hardware``), else None (CPU)."""
    if configured:
        return float(configured)
    if torch.cuda.is_available():
        return peak_tflops_of(torch.cuda.get_device_name())
    return None


def peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    except ImportError:
        return float("nan")


class MetricsWriter:
    """JSONL (rank 0) and optional TensorBoard."""

    def __init__(self, jsonl_path: Optional[str], tensorboard_dir: Optional[str], enabled: bool):
        self.enabled = enabled
        self.file = None
        self.tb = None
        if not enabled:
            return
        if jsonl_path:
            os.makedirs(os.path.dirname(os.path.abspath(jsonl_path)), exist_ok=True)
            self.file = open(jsonl_path, "a", encoding="utf-8")
        if tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(tensorboard_dir)
            except ImportError:
                print(f"logging.tensorboard_dir={tensorboard_dir!r}: tensorboard is not installed "
                      "(pip install -e \".[tensorboard]\"); TensorBoard logging is off", flush=True)

    def write(self, record: Dict) -> None:
        if not self.enabled:
            return
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        if self.tb:
            step = record.get("iteration", 0)
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "iteration" and math.isfinite(v):
                    self.tb.add_scalar(f"{record.get('split', 'train')}/{k}", v, step)

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tb:
            self.tb.close()


def truncate_metrics(path: str, iteration: int) -> None:
    """Drop rows past ``iteration`` (logged by a run that crashed after its last checkpoint),
    so a resumed run's rows do not repeat; the file is replaced atomically."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a row cut short by the crash
            if isinstance(rec, dict) and rec.get("iteration", 0) <= iteration:
                kept.append(json.dumps(rec) + "\n")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)
    os.replace(tmp, path)


def throughput(tokens: int, seconds: float, flops_per_token: float,
               dense_flops_per_token: float, world: int, peak: Optional[float]) -> Dict:
    tok_s = tokens / seconds
    tflops = tok_s * flops_per_token / world / 1e12  # per GPU/process
    out = dict(tokens_per_s=tok_s, tflops_per_device=tflops,
               dense_equiv_tflops_per_device=tok_s * dense_flops_per_token / world / 1e12)
    if peak:
        out["mfu"] = tflops / peak
    return out
