"""The questions a user asks before a run: does it fit, what is the smallest change that makes
it fit, which layouts are fastest, and how does it scale (weak scaling, 8 to 1024 GPUs)."""

from __future__ import annotations

from dataclasses import replace
from typing import Dict, List, Optional

from crnet_megatron.model.rules import layout_problems
from crnet_megatron.planner.hardware import GPU
from crnet_megatron.planner.memory import GIB, plan_memory
from crnet_megatron.planner.per_rank import Plan
from crnet_megatron.planner.step_time import step_time


def evaluate(plan: Plan, gpu: GPU) -> Dict:
    mem = plan_memory(plan)
    t = step_time(plan, gpu)
    return dict(plan=plan, memory=mem, time=t, fits=mem["total"] <= gpu.memory_gib * GIB)


def valid(plan: Plan, gpus: int) -> bool:
    """A layout a real run accepts (``model.rules``), on exactly ``gpus`` GPUs."""
    s = plan.shape
    if plan.tp * plan.pp * plan.dp != gpus or (plan.recompute == "crnet" and not s.chained):
        return False
    return not layout_problems(heads=s.heads, groups=s.groups, ffn=s.ffn, layers=s.layers,
                               seq=plan.seq, tp=plan.tp, pp=plan.pp, sequence_parallel=plan.sp,
                               first=plan.first_stage_layers, last=plan.last_stage_layers,
                               vpp=plan.vpp, world=gpus, micro_batch=plan.micro_batch,
                               global_batch=plan.global_batch)


def recompute_modes(plan: Plan) -> List[str]:
    return ["none", "selective", "full"] + (["crnet"] if plan.shape.chained else [])


def search(plan: Plan, gpu: GPU, gpus: int, top: int = 5,
           node: Optional[int] = None) -> List[Dict]:
    """The fastest layouts that fit: TP within a node, PP dividing the layers (1F1B or
    interleaved with 2 or 4 chunks per rank, even stages or first/last stages a layer
    lighter), every micro-batch size and recompute mode; the global batch is kept."""
    node = node or gpu.gpus_per_node
    found = []
    for tp in (t for t in (1, 2, 4, 8) if t <= node and gpus % t == 0):
        for pp in (p for p in range(1, 65) if (gpus // tp) % p == 0):
            dp = gpus // (tp * pp)
            for pipe in pipeline_options(plan.shape.layers, pp):
                for mbs in (1, 2, 4, 8):
                    for mode in recompute_modes(plan):
                        cand = replace(plan, tp=tp, pp=pp, dp=dp, micro_batch=mbs,
                                       recompute=mode, sequence_parallel=tp > 1, **pipe)
                        if not valid(cand, gpus):
                            continue
                        r = evaluate(cand, gpu)
                        if r["fits"]:
                            found.append(r)
    found.sort(key=lambda r: -r["time"]["tokens_per_s"])
    return found[:top]


def pipeline_options(layers: int, pp: int) -> List[Dict]:
    """The pipeline schedules the search tries at ``pp`` stages: 1F1B and interleaved (2, 4
    chunks per rank), each with even stages and with the first and last stages one layer
    lighter (they also hold the embedding, and the output layer and loss); the layout rules
    drop those that do not split."""
    if pp == 1:
        return [{}]
    per = layers // pp
    ends = [(None, None)] + ([(per - 1, per - 1), (None, per - 1)] if per > 1 else [])
    return [dict(vpp=v, first_stage_layers=f, last_stage_layers=last)
            for v in (None, 2, 4) for f, last in ends]


def smallest_fix(plan: Plan, gpu: GPU) -> Optional[Dict]:
    """One change to a layout that does not fit (recompute mode, micro-batch, distributed
    optimizer, then more TP or PP within the same GPUs): the fastest one that fits."""
    gpus = plan.gpus
    options = [replace(plan, recompute=m) for m in recompute_modes(plan) if m != plan.recompute]
    options += [replace(plan, micro_batch=b) for b in (1, 2, 4) if b < plan.micro_batch]
    if not plan.distributed_optimizer:
        options.append(replace(plan, distributed_optimizer=True))
    for tp in (2, 4, 8):
        if tp > plan.tp and gpus % (tp * plan.pp) == 0:
            options.append(replace(plan, tp=tp, dp=gpus // (tp * plan.pp), sequence_parallel=True))
    for pp in (2, 4, 8, 16):
        if pp > plan.pp and gpus % (plan.tp * pp) == 0:
            options.append(replace(plan, pp=pp, dp=gpus // (plan.tp * pp), vpp=None,
                                   first_stage_layers=None, last_stage_layers=None))
    fits = [evaluate(p, gpu) for p in options if valid(p, gpus)]
    fits = [r for r in fits if r["fits"]]
    return max(fits, key=lambda r: r["time"]["tokens_per_s"]) if fits else None


def weak_scaling(plan: Plan, gpu: GPU, counts=(8, 16, 32, 64, 128, 256, 512, 1024)) -> List[Dict]:
    """Fixed model and per-replica work (TP, PP, micro-batch, micro-batches per replica):
    only DP grows. Efficiency = tokens/s per GPU relative to the first count."""
    per_replica = plan.global_batch // plan.dp
    rows, base = [], None
    for n in counts:
        if n % (plan.tp * plan.pp):
            continue
        dp = n // (plan.tp * plan.pp)
        p = replace(plan, dp=dp, global_batch=per_replica * dp)
        t = step_time(p, gpu)
        base = base or t["tokens_per_s_per_gpu"]
        rows.append(dict(gpus=n, dp=dp, global_batch=p.global_batch,
                         tokens_per_s=t["tokens_per_s"], tokens_per_s_per_gpu=t["tokens_per_s_per_gpu"],
                         mfu=t["mfu"], dp_exposed_s=t["dp_exposed_s"], step_s=t["step_s"],
                         efficiency=t["tokens_per_s_per_gpu"] / base))
    return rows
