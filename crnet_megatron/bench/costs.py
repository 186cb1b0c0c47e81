"""What one training step and one checkpoint save cost a rank, measured through the real driver
on local processes (gloo on CPU, NCCL on GPU). Prints two tables, writes JSON.

* per step at TP=2 x PP=2 + SP (4 processes, the tiny model, bf16, CR-Net recompute): host
  syncs (``item``, ``tolist``, ``__bool__``, ``__float__``, ``__int__``, ``.cpu()`` of
  tensors), TP collectives by kind (calls, and how many move fewer than 64 elements; the
  batch broadcasts are not counted), and dataset samples read by each rank;
* per save at DP=2 with the distributed optimizer (14.0M parameters: 8 layers, h 512, r 128):
  the stall (seconds the training loop waits) and the peak extra host RSS of the trainer
  process during it, for ``dp_reshardable`` and ``fully_reshardable``, synchronous and async,
  interleaved over rounds (for async also the time until the checkpoint is complete).

    crnet-bench costs --json bench_costs.json
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import warnings

from crnet_megatron.bench import runner
from crnet_megatron.config.tiny import QUIET, TINY_MODEL

warnings.filterwarnings("ignore")

TINY = TINY_MODEL + QUIET + ["schedule.micro_batch_size=2", "schedule.global_batch_size=8",
                             "eval.eval_interval=1000", "schedule.train_iters=100"]
STEP_LAYOUT = ["parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2",
               "parallel.sequence_parallel=true", "optimizer.bf16=true",
               "recompute.recompute_granularity=crnet", "recompute.crnet_checkpoint_every=2"]
SAVE_MODEL = ["model.num_layers=8", "model.hidden_size=512", "model.ffn_hidden_size=1376",
              "model.num_attention_heads=8", "model.crnet_rank=128", "model.seq_length=128",
              "schedule.micro_batch_size=1", "schedule.global_batch_size=2",
              "data.builtin_vocab_size=2048", "parallel.use_distributed_optimizer=true"]
SAVE_VARIANTS = [("dp_reshardable", False, False), ("fully_reshardable", True, False),
                 ("dp_reshardable", False, True), ("fully_reshardable", True, True)]


def _setup(rank, world, port):
    import torch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)


def _step_worker(rank, world, port, sets, out):
    _setup(rank, world, port)
    from megatron.core import parallel_state as ps

    from crnet_megatron.config.run_config import load_run_config
    from crnet_megatron.diagnostics.comm_counter import CommCounter
    from crnet_megatron.diagnostics.profiling import (
        HostSyncCounter,
        count_dataset_reads,
    )
    from crnet_megatron.training.trainer import Trainer

    reads = count_dataset_reads()
    trainer = Trainer(load_run_config(None, sets))
    data = trainer._iterators(trainer.train_ds, 0)
    trainer.train_step(data)  # first step: allocations, conditioning statistics
    reads[0] = 0
    syncs = HostSyncCounter()
    with CommCounter(ps.get_tensor_model_parallel_group()) as comm, syncs:
        trainer.train_step(data)
    row = dict(rank=rank, tp=ps.get_tensor_model_parallel_rank(),
               pp=ps.get_pipeline_model_parallel_rank(), host_syncs=syncs.calls,
               tp_calls=comm.call_counts(), tp_scalar_calls=sum(n < 64 for _, n, _ in comm.calls),
               samples_read=reads[0])
    with open(f"{out}.{rank}", "w") as f:
        json.dump(row, f)


class _PeakRSS:
    """Peak resident set of this process while entered, above the start: Linux's high-water
    mark (VmHWM) reset on entry through ``/proc/self/clear_refs`` (no sampling thread: a
    thread running while the async writer forks could hold a lock the child then waits on)."""

    def __enter__(self):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        self.start = self._status("VmRSS")
        return self

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"/proc/self/status has no {key}")

    def __exit__(self, *exc):
        self.extra = self._status("VmHWM") - self.start


def _save_worker(rank, world, port, sets, rounds, out):
    _setup(rank, world, port)
    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

    from crnet_megatron.config.run_config import load_run_config
    from crnet_megatron.training.trainer import Trainer

    trainer = Trainer(load_run_config(None, sets))
    trainer.train_step(trainer._iterators(trainer.train_ds, 0))  # Adam states exist
    rows = []
    for r in range(rounds):
        for name, full, use_async in SAVE_VARIANTS:
            trainer.cfg["checkpoint"]["optim_fully_reshardable"] = full
            trainer.async_saves = AsyncCallsQueue() if use_async else None
            trainer.iteration += 1
            start = time.perf_counter()
            with _PeakRSS() as rss:
                trainer.save()
            stall = time.perf_counter() - start
            trainer.finish_saves(blocking=True)
            rows.append(dict(round=r, rank=rank, format=name, mode="async" if use_async else "sync",
                             stall_s=stall, complete_s=time.perf_counter() - start,
                             extra_rss_mib=rss.extra / 2**20))
    with open(f"{out}.{rank}", "w") as f:
        json.dump(rows, f)


def _spawn(fn, world, *args):
    import torch.multiprocessing as mp

    from crnet_megatron.parallel.launch import free_port

    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "rows")
        mp.start_processes(fn, args=(world, free_port(), *args, out), nprocs=world,
                           start_method="spawn")
        return [json.load(open(f"{out}.{r}")) for r in range(world)]


def _median(values):
    values = sorted(values)
    return values[len(values) // 2]


def main(argv=None):
    p = runner.parser(__doc__, "costs", repeats=3)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        cache = [f"data.cache_dir={d}/cache"]
        steps = _spawn(_step_worker, 4, TINY + STEP_LAYOUT + cache)
        saves = _spawn(_save_worker, 2, TINY + SAVE_MODEL + cache + [f"checkpoint.save={d}/ck",
                                                                    "checkpoint.keep_last=1"],
                       args.repeats)
    step_rows = [dict(r, tp_calls=", ".join(f"{k} {v}" for k, v in sorted(r["tp_calls"].items())))
                 for r in steps]
    step_cols = [("rank", "rank", ""), ("TP", "tp", ""), ("PP", "pp", ""),
                 ("host syncs", "host_syncs", ""), ("TP calls", "tp_calls", ""),
                 ("scalar TP calls", "tp_scalar_calls", ""), ("samples read", "samples_read", "")]
    save_rows = []
    for name, _, use_async in SAVE_VARIANTS:
        mode = "async" if use_async else "sync"
        got = [x for per_rank in saves for x in per_rank if x["format"] == name and x["mode"] == mode]
        save_rows.append(dict(format=name, mode=mode, stall_s=_median([x["stall_s"] for x in got]),
                              complete_s=_median([x["complete_s"] for x in got]),
                              extra_rss_mib=max(x["extra_rss_mib"] for x in got)))
    save_cols = [("format", "format", ""), ("mode", "mode", ""), ("stall s", "stall_s", ".3f"),
                 ("complete s", "complete_s", ".3f"),
                 ("peak extra RSS MiB (max over ranks)", "extra_rss_mib", ".1f")]
    runner.finish(args, [
        runner.table(step_rows, step_cols, "one training step, TP=2 x PP=2 + SP, bf16, CR-Net recompute, "
                     "tiny model (4 layers, 4 micro-batches)"),
        runner.table(save_rows, save_cols, f"one save, DP=2, distributed optimizer, 14.0M "
                     f"parameters (median stall over {args.repeats} interleaved rounds)")],
        steps=steps, saves=saves, save_summary=save_rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
