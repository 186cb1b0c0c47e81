"""What rank 0 prints while training, for a terminal or for a log file.

On a terminal (``logging.progress_bar`` and stdout a TTY) a tqdm bar shows every step; messages
(checkpoints, evaluations) go above it with ``tqdm.write`` so they never break it. In a log file
(Slurm, nohup, a pipe) there is no bar: one line per ``log_interval`` in Megatron-LM's style
(iteration, consumed samples and tokens, time per iteration, learning rate, the interval's mean
loss, grad norm, tokens/s, TFLOP/s, MFU, memory, skipped steps).
"""

from __future__ import annotations

import datetime
import sys
import time
from typing import Dict, Optional

from tqdm import tqdm


def wants_bar(progress_bar: bool, stream=None) -> bool:
    stream = stream or sys.stdout
    return bool(progress_bar) and hasattr(stream, "isatty") and stream.isatty()


class IntervalWindow:
    """The current logging interval: its start, steps, tokens and the losses of its steps."""

    def __init__(self):
        self.start, self.steps, self.tokens = time.perf_counter(), 0, 0
        self.loss_sum, self.losses = 0.0, 0

    def add(self, out: Dict[str, float], tokens: int) -> None:
        self.steps += 1
        self.tokens += tokens
        if not out["skipped"]:
            self.loss_sum += out["loss"]
            self.losses += 1


class Console:
    def __init__(self, enabled: bool, bar: bool, total: int, initial: int):
        self.enabled, self.total = enabled, total
        self.bar = tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True,
                        disable=not (enabled and bar))
        self.use_bar = enabled and bar

    def say(self, message: str) -> None:
        if not self.enabled:
            return
        if self.use_bar:
            tqdm.write(message)
        else:
            print(message, flush=True)

    def step(self, loss: float, lr: float) -> None:
        if self.use_bar:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}")

    def log(self, rec: Dict, consumed: int, tokens: int, ms_per_iter: float) -> None:
        """A metrics row (``rec``: the interval's mean loss, lr, grad norm, throughput)."""
        if not self.enabled:
            return
        if self.use_bar:
            self.bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{rec['lr']:.2e}",
                                 tok_s=f"{rec['tokens_per_s']:,.0f}")
            return
        mfu = rec.get("mfu")
        print(f" [{datetime.datetime.now():%Y-%m-%d %H:%M:%S}] iteration "
              f"{rec['iteration']:>8d}/{self.total:>8d} | consumed samples: {consumed:>12d} | "
              f"consumed tokens: {tokens:>14d} | elapsed time per iteration (ms): "
              f"{ms_per_iter:.1f} | learning rate: {rec['lr']:.6E} | lm loss: "
              f"{rec['loss']:.6E} | grad norm: {rec['grad_norm']:.3f} | tokens/s: "
              f"{rec['tokens_per_s']:,.0f} | TFLOP/s/device: {rec['tflops_per_device']:.2f} | "
              f"MFU: {_pct(mfu)} | mem GB: {rec['peak_memory_gb']:.2f} | skipped: "
              f"{rec['skipped_total']} |", flush=True)

    def close(self) -> None:
        self.bar.close()


def _pct(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.1%}"
