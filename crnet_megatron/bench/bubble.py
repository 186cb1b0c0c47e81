"""The pipeline bubble measured: per-stage busy and idle time of one CR-Net step at PP=4 under
Megatron's 1F1B and interleaved schedules (same model, same micro-batches), next to the
planner's prediction.

Busy is the time a rank spends in Megatron's ``forward_step`` and ``backward_step`` (every
model chunk); idle is the rest of the step (waiting on P2P: the bubble and the transfers). The
two schedules run in the same processes, one step of each in turn after warm-up (the virtual
pipeline size is switched between them), and each stage's median over the repeats is reported.
Each rank needs a core (or a GPU) of its own: with fewer cores than ranks, ranks that compute
at the same time share cores and the measured idle time is the scheduler's, not the
pipeline's (the table says so). The P2P transfers count as idle, so a model whose boundary is
large against its compute (``--hidden`` small) shows the interleaved schedule's extra
transfers more than its smaller bubble.

    crnet-bench bubble --pp 4 --microbatches 8 --repeats 5 --json bench_bubble.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

from crnet_megatron.bench import runner

SEQ, MBS, VOCAB = 128, 2, 512


def _shape(hidden: int) -> dict:
    """8 layers of LLaMA proportions (the rank a quarter of the hidden size)."""
    return dict(num_layers=8, hidden_size=hidden, ffn_hidden_size=hidden * 8 // 3 // 8 * 8,
                num_attention_heads=hidden // 32, crnet_rank=hidden // 4)


def _config(pp: int, vpp, hidden: int):
    from crnet_megatron import CRNetConfig

    return CRNetConfig(**_shape(hidden), pipeline_model_parallel_size=pp,
                       virtual_pipeline_model_parallel_size=vpp, use_cpu_initialization=True)


def _timed_schedules(busy: List[float]) -> None:
    """Add the seconds of every forward and backward step of this rank to ``busy[0]``."""
    from megatron.core.pipeline_parallel import schedules

    def timed(fn):
        def run(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                busy[0] += time.perf_counter() - t0
        return run

    schedules.forward_step = timed(schedules.forward_step)
    schedules.backward_step = timed(schedules.backward_step)


def _step_fn():
    import torch

    def step(data_iterator, model):
        if not (model.pre_process or model.post_process):
            return model(None, None, None), lambda o: (o, {})
        g = torch.Generator().manual_seed(next(data_iterator))
        tokens = torch.randint(0, VOCAB, (MBS, SEQ + 1), generator=g)
        pos = torch.arange(SEQ)[None].expand(MBS, -1)
        out = model(tokens[:, :-1], pos, None, labels=tokens[:, 1:])
        return out, lambda o: (o.float().mean(), {})

    return step


def worker(pp: int, vpp: int, microbatches: int, warmup: int, repeats: int, out: str,
           hidden: int) -> None:
    """One rank: both schedules' models, then timed steps in turn; writes its JSON."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from crnet_megatron.parallel.build import build_model_chunks
    from crnet_megatron.parallel.groups import destroy_distributed, init_distributed
    from crnet_megatron.parallel.pipeline import forward_backward

    torch.set_num_threads(1)
    init_distributed(1, pp, seed=1, virtual_pipeline_model_parallel_size=vpp)
    models = {"interleaved": build_model_chunks(_config(pp, vpp, hidden), VOCAB, SEQ, seed=1)}
    ps.set_virtual_pipeline_model_parallel_world_size(None)
    models["1F1B"] = build_model_chunks(_config(pp, None, hidden), VOCAB, SEQ, seed=1)
    busy, step = [0.0], _step_fn()
    _timed_schedules(busy)
    times: Dict[str, List[List[float]]] = {name: [] for name in models}
    for i in range(warmup + repeats):
        for name, chunks in models.items():
            ps.set_virtual_pipeline_model_parallel_world_size(vpp if name != "1F1B" else None)
            dist.barrier()
            busy[0], t0 = 0.0, time.perf_counter()
            forward_backward(forward_step_func=step, data_iterator=iter(range(microbatches)),
                             model=chunks, num_microbatches=microbatches, seq_length=SEQ,
                             micro_batch_size=MBS)
            dist.barrier()
            if i >= warmup:
                times[name].append([time.perf_counter() - t0, busy[0]])
    with open(f"{out}.{dist.get_rank()}", "w") as f:
        json.dump(times, f)
    destroy_distributed()


def _launch(args, out: str) -> List[Dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={args.pp}", "-m", "crnet_megatron.bench.bubble", "--worker", out,
           "--pp", str(args.pp), "--vpp", str(args.vpp), "--microbatches", str(args.microbatches),
           "--repeats", str(args.repeats), "--warmup", str(args.warmup),
           "--hidden", str(args.hidden)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, timeout=1800)
    ranks = []
    for r in range(args.pp):
        with open(f"{out}.{r}") as f:
            ranks.append(json.load(f))
    return ranks


def _rows(args, ranks: List[Dict]) -> List[Dict]:
    from crnet_megatron.analysis.counting import ModelShape
    from crnet_megatron.planner.hardware import get_gpu
    from crnet_megatron.planner.per_rank import Plan
    from crnet_megatron.planner.step_time import step_time

    config = _config(1, None, args.hidden)
    rows = []
    for name, vpp in (("1F1B", None), ("interleaved", args.vpp)):
        plan = Plan(ModelShape.from_config(config, VOCAB), config.crnet_layer_ranks, SEQ,
                    pp=args.pp, vpp=vpp, micro_batch=MBS, global_batch=MBS * args.microbatches,
                    bf16=False)
        predicted = step_time(plan, get_gpu("h100-80gb"))["bubble_fraction"]
        for stage, rank in enumerate(ranks):
            wall = statistics.median(t[0] for t in rank[name])
            busy = statistics.median(t[1] for t in rank[name])
            rows.append(dict(schedule=name, vpp=vpp or 1, stage=stage, step_ms=1e3 * wall,
                             busy_ms=1e3 * busy, idle_ms=1e3 * (wall - busy),
                             idle_share=(wall - busy) / wall, planner_bubble=predicted))
    return rows


def main(argv=None):
    p = runner.parser(__doc__, "bubble", repeats=5, warmup=2)
    p.add_argument("--pp", type=int, default=4)
    p.add_argument("--vpp", type=int, default=2)
    p.add_argument("--microbatches", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--worker", help=argparse.SUPPRESS)  # one rank, launched by main
    args = p.parse_args(argv)
    if args.worker:
        return worker(args.pp, args.vpp, args.microbatches, args.warmup, args.repeats,
                      args.worker, args.hidden)
    with tempfile.TemporaryDirectory() as d:
        rows = _rows(args, _launch(args, os.path.join(d, "times.json")))
    columns = [("schedule", "schedule", ""), ("chunks/rank", "vpp", ""), ("stage", "stage", ""),
               ("step ms", "step_ms", ".1f"), ("busy ms", "busy_ms", ".1f"),
               ("idle ms", "idle_ms", ".1f"), ("idle share", "idle_share", ".1%"),
               ("planner bubble", "planner_bubble", ".1%")]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    title = ("" if (cores or 0) >= args.pp else
             f"ONLY {cores} CORES FOR {args.pp} RANKS: idle time is mostly core sharing. ")
    title += (f"PP={args.pp}, {args.microbatches} micro-batches of {MBS}x{SEQ}, "
             f"8-layer CR-Net (hidden {args.hidden}); median of "
             f"{args.repeats} steps per schedule, run in turn after {args.warmup} warm-up")
    runner.finish(args, [runner.table(rows, columns, title)], rows=rows,
                  shape=_shape(args.hidden))


if __name__ == "__main__":
    sys.exit(main())
