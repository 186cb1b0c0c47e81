"""Per-step metrics: throughput, TFLOP/s and MFU from CR-Net's own FLOP count (with the dense
equivalent beside it), peak memory; written to a JSONL file and TensorBoard when installed."""

from __future__ import annotations

import json
import math
import os
from typing import Dict, Optional

import torch

from crnet_megatron.data.safe_files import (
    atomic_writer,
    bounded_lines,
    check_target,
    loads_json,
    open_append,
)
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
            self.file = open_append(jsonl_path, "metrics file")
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


MAX_ROW_BYTES = 1 << 16  # a metrics row is a few hundred bytes


def valid_row(rec, last: Dict[str, int], iteration: int) -> bool:
    """A row this project writes: ``split`` train/valid, an int ``iteration`` in order and at
    most ``iteration``, every other value a number, bool or null."""
    if not isinstance(rec, dict) or rec.get("split") not in ("train", "valid"):
        return False
    it = rec.get("iteration")
    if not isinstance(it, int) or isinstance(it, bool) or not 0 <= it <= iteration \
            or it < last.get(rec["split"], 0):
        return False
    if not all(isinstance(k, str) and (v is None or isinstance(v, (int, float, bool)))
               for k, v in rec.items() if k != "split"):
        return False
    last[rec["split"]] = it
    return True


def truncate_metrics(path: str, iteration: int) -> None:
    """Keep the rows up to ``iteration`` (a crashed run may have logged past its last
    checkpoint) that are rows this project writes (``valid_row``; a received file may hold
    anything), and replace the file atomically, never through a link."""
    if not os.path.exists(path):
        return
    check_target(path, "metrics file")
    kept, dropped, last = [], 0, {}
    with open(path, "rb") as f:
        for raw in bounded_lines(f, MAX_ROW_BYTES):
            try:
                rec = loads_json(raw, "metrics row") if raw is not None else None
            except ValueError:
                rec = None  # e.g. a row cut short by the crash, or nested without end
            past = isinstance(rec, dict) and isinstance(rec.get("iteration"), int) \
                and rec["iteration"] > iteration  # logged after the checkpoint: not kept
            if valid_row(rec, last, iteration):
                kept.append(json.dumps(rec) + "\n")
            elif not past:
                dropped += 1
    if dropped:
        print(f"note: {path}: {dropped} row(s) that are not this project's metrics rows were "
              "dropped", flush=True)
    with atomic_writer(path, "metrics file") as f:
        f.writelines(kept)


def throughput(tokens: int, seconds: float, flops_per_token: float,
               dense_flops_per_token: float, world: int, peak: Optional[float]) -> Dict:
    tok_s = tokens / seconds
    tflops = tok_s * flops_per_token / world / 1e12  # per GPU/process
    out = dict(tokens_per_s=tok_s, tflops_per_device=tflops,
               dense_equiv_tflops_per_device=tok_s * dense_flops_per_token / world / 1e12)
    if peak:
        out["mfu"] = tflops / peak
    return out
