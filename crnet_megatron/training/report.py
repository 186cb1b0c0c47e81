"""What a run reports (the trainer's half that prints and writes): the start-up summary and
run files, the per-step bar and interval rows, validation records, and the closing lines."""

from __future__ import annotations

import math
import os
import time
from typing import Any, Dict, Optional

import torch.distributed as dist

from crnet_megatron.checkpoint import run_dir
from crnet_megatron.config import run_config
from crnet_megatron.training import preflight
from crnet_megatron.training.console import IntervalWindow
from crnet_megatron.training.metrics import peak_memory_gb, throughput
from crnet_megatron.training.plot import plot_metrics


class RunReport:
    """Mixed into ``Trainer``: reads its state (config, model, counters, writer, console)."""

    def _log_start(self):
        """Rank 0: the resolved config (also written with the tokenizer into the run
        directory), the model's size and FLOPs, and the pipeline boundary's bytes."""
        if not self.rank0:
            return
        cfg, save = self.cfg, self.cfg["checkpoint"]["save"]
        print(self.banner, flush=True)
        print("resolved config:\n" + run_config.dump(cfg), flush=True)
        if save:
            run_dir.write_run_files(save, f"# {self.banner}\n" + run_config.dump(cfg),
                                    self.tokenizer.path, self.iteration, self.schedule_changes)
        warning = preflight.sequence_parallel_warning(cfg)
        if warning:
            print(warning, flush=True)
        params = sum(p.numel() for chunk in self.model for p in chunk.parameters())
        print(f"{self.config.crnet_variant}: {params / 1e6:.2f}M params on this rank; ranks "
              f"{self.config.crnet_layer_ranks}; {self.flops / 1e9:.3f} GFLOP/token (dense "
              f"equivalent {self.dense_flops / 1e9:.3f}); MFU peak {self.peak or 'n/a'} TFLOP/s",
              flush=True)
        if self.boundary:
            b = self.boundary
            print(f"pipeline boundary per micro-batch per rank: {b['crnet_bytes'] / 2**20:.2f}"
                  f" MiB ({b['ratio']:.2f}x the dense model's {b['dense_bytes'] / 2**20:.2f} "
                  "MiB)", flush=True)

    def _log_step(self, out: Dict[str, float]) -> None:
        """The bar every step; every ``log_interval`` (and at the last step) a metrics row with
        the interval's mean loss (Megatron's and torchtitan's), and a line in a log file."""
        s, lg = self.cfg["schedule"], self.cfg["logging"]
        tokens = s["global_batch_size"] * self.cfg["model"]["seq_length"]
        self._window.add(out, tokens)
        self.console.step(out["loss"], self._lr())
        if self.iteration % lg["log_interval"] and self.iteration != s["train_iters"]:
            return
        w, dt = self._window, time.perf_counter() - self._window.start
        loss = w.loss_sum / w.losses if w.losses else out["loss"]
        rec = dict(split="train", iteration=self.iteration, loss=loss,
                   ppl=math.exp(min(loss, 50)), lr=self._lr(),
                   grad_norm=out["grad_norm"], skipped_total=self.skipped_total,
                   peak_memory_gb=peak_memory_gb(),
                   **throughput(w.tokens, dt, self.flops, self.dense_flops,
                                dist.get_world_size(), self.peak))
        self.writer.write(rec)
        self.console.log(rec, self.consumed, self.consumed * self.cfg["model"]["seq_length"],
                         1e3 * dt / max(w.steps, 1))
        self._window = IntervalWindow()

    def _close(self, stopped_by: Optional[str]) -> None:
        if self.rank0 and stopped_by == "signal":
            print(f"stopped by signal at iteration {self.iteration}; checkpoint saved", flush=True)
        self.writer.close()
        path = self.metrics_path
        if self.rank0 and self.cfg["logging"]["plot"] and path and os.path.exists(path):
            print(f"loss curves: {plot_metrics(path)}", flush=True)

    def _say(self, message: str) -> None:
        console = getattr(self, "console", None)
        console.say(message) if console else print(message, flush=True)

    def _lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def _eval_record(self) -> Dict[str, Any]:
        loss = self.evaluate()
        rec = dict(split="valid", iteration=self.iteration, loss=loss, ppl=math.exp(min(loss, 50)))
        self.writer.write(rec)
        if self.rank0:
            self.console.say(f"iteration {self.iteration}: validation loss {loss:.4f}, "
                             f"perplexity {rec['ppl']:.2f}")
        return rec
