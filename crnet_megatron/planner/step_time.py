"""Step time from a stated alpha-beta model (the constants are in ``hardware.py``).

* GEMMs: each matmul of a layer on this rank (sharded as ``linears.py`` and Megatron shard
  them), a roofline ``max(FLOPs / (peak x gemm_efficiency), bytes / HBM bandwidth)``; backward
  = dgrad + wgrad = 2x forward. CR-Net's r-wide matmuls get their own roofline, so narrow
  GEMMs cost what they cost.
* Attention: causal flash attention, ``2 s T q / t`` FLOPs forward at attention_efficiency,
  backward 2.5x forward. Element-wise ops (norms, residual adds, RoPE, SwiGLU, chain updates,
  the loss) are HBM-bound.
* Recompute adds: ``full`` one more forward per layer; ``selective`` the attention forward;
  ``crnet`` the attention and element-wise forward, the Z B matmuls of the layers whose chain
  is inverted, and the dense layers' forward.
* TP: the per-layer collective volumes of ``counting.tp_layer_comm`` (the exact counts the
  communication counter measures) as ring wire bytes over NVLink, plus a latency per call;
  ``tp_exposed`` of it is not hidden (1.0: this project does not overlap TP communication;
  Megatron's TE ``--tp-comm-overlap`` hides most of a dense model's).
* PP: 1F1B, ``(M + PP - 1)`` micro-batch slots of the slowest stage (bubble
  ``(PP - 1)/(M + PP - 1)``); interleaved with v model chunks per rank, ``(v M + PP - 1)``
  chunk slots of 1/v of it (bubble ``(PP - 1)/(v M + PP - 1)``), at the price of v stage
  boundaries per rank and micro-batch. Each boundary sends the stage payload forward and its
  gradient back, over NVLink inside a node and InfiniBand across nodes (not hidden: an upper
  bound where Megatron overlaps the interleaved schedule's P2P). The slowest rank sets the
  pace: uneven first/last stages move layers off the ranks that also hold the embedding or
  the output layer and loss.
* DP: fp32 gradient all-reduce, or reduce-scatter + bf16 parameter all-gather with the
  distributed optimizer, over InfiniBand once the DP group leaves the node; with overlap the
  reduce hides behind the last micro-batch's backward and the gather behind the first forward
  (Megatron's ``--overlap-grad-reduce`` / ``--overlap-param-gather``).
* The optimizer step is HBM-bound (Adam reads and writes ~30 B per parameter it owns).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Tuple

from crnet_megatron.analysis.counting import (
    comm_wire_bytes,
    flops_per_token,
    layer_collective_calls,
    tp_layer_comm,
)
from crnet_megatron.planner.hardware import GPU
from crnet_megatron.planner.memory import payload_elements_per_token
from crnet_megatron.planner.per_rank import Plan, recomputed_layers, stage_params


@dataclass(frozen=True)
class Overlap:
    tp_exposed: float = 1.0
    dp_overlap: bool = True


def _gemms(plan: Plan, rank) -> List[Tuple[float, float, float]]:
    """(m, k, n) of one layer's forward matmuls on one rank."""
    s, t = plan.shape, plan.tp
    T = plan.seq * plan.micro_batch
    T_local = T / t if plan.sp else T
    h, f, q, kv = s.hidden, s.ffn, s.q_size, s.kv_size
    if rank is None:
        return [(T, h, (q + 2 * kv) / t), (T, q / t, h), (T, h, 2 * f / t), (T, f / t, h)]
    r = rank
    return [(T_local, h, 3 * r), (T, r, q / t), (T, r, kv / t), (T, r, kv / t),
            (T_local, h, 2 * r), (T, r, f / t), (T, r, f / t),
            (T, q / t, r), (T_local, r, h), (T, f / t, r), (T_local, r, h)]


def layer_gemm_flops(plan: Plan, rank) -> float:
    """Forward GEMM FLOPs of one layer on one rank (``rank=None``: a dense layer)."""
    return sum(2 * m * k * n for m, k, n in _gemms(plan, rank))


def _gemm_time(m, k, n, gpu: GPU, dtype: int) -> float:
    flops = 2.0 * m * k * n
    bytes_ = dtype * (m * k + k * n + m * n)
    return max(flops / (gpu.peak_tflops * 1e12 * gpu.gemm_efficiency), bytes_ / (gpu.hbm_tb_s * 1e12))


def _elementwise_bytes(plan: Plan, rank) -> float:
    """HBM bytes per token of one layer's element-wise forward ops."""
    s, t = plan.shape, plan.tp
    H = s.hidden / t if plan.sp else s.hidden
    q, kv, f = s.q_size / t, s.kv_size / t, s.ffn / t
    n = 2 * 2 * H + 2 * 3 * H + 2 * (q + kv) + 4 * f
    if rank is not None and s.chained:
        n += 3 * ((q + 2 * kv) + 2 * f + 2 * H)
    return n * (2 if plan.bf16 else 4)


def layer_times(plan: Plan, gpu: GPU, layer: int, recomputed: bool = True) -> Dict[str, float]:
    """Seconds of one layer for one micro-batch: forward, backward, recompute (``recomputed``:
    whether ``full`` recompute checkpoints this layer), TP comm."""
    dtype = 2 if plan.bf16 else 4
    T = plan.seq * plan.micro_batch
    rank = plan.ranks[layer]
    gemm = sum(_gemm_time(m, k, n, gpu, dtype) for m, k, n in _gemms(plan, rank))
    attn = 2.0 * plan.seq * T * plan.shape.q_size / plan.tp / (
        gpu.peak_tflops * 1e12 * gpu.attention_efficiency)
    elem = _elementwise_bytes(plan, rank) * T / (gpu.hbm_tb_s * 1e12)
    fwd = gemm + attn + elem
    bwd = 2 * gemm + 2.5 * attn + 2 * elem
    mode = plan.recompute
    if mode == "full":
        re = fwd if recomputed else 0.0
    elif mode == "selective":
        re = attn
    elif mode == "crnet":
        if rank is None:
            re = fwd
        else:  # Z B of this layer re-multiplied to invert the chain below it (most layers)
            b_gemms = [g for g in _gemms(plan, rank) if g[1] == rank and g[2] != rank]
            re = attn + elem + sum(_gemm_time(m, k, n, gpu, dtype) for m, k, n in b_gemms)
    else:
        re = 0.0
    comm = tp_layer_time(plan, gpu, rank)
    return dict(forward=fwd, backward=bwd, recompute=re, tp_comm=comm)


def tp_layer_time(plan: Plan, gpu: GPU, rank) -> float:
    if plan.tp == 1:
        return 0.0
    T = plan.seq * plan.micro_batch
    elements = tp_layer_comm(plan.shape.hidden, rank, plan.tp, plan.sp, T)
    dtype = 2 if plan.bf16 else 4
    wire = comm_wire_bytes(elements, plan.tp, dtype)
    calls = sum(layer_collective_calls(plan.sp, dense=rank is None).values())
    bw = gpu.nvlink_gb_s * 1e9 * gpu.link_efficiency
    steps = math.ceil(math.log2(plan.tp))
    return wire / bw + calls * steps * gpu.nvlink_latency_us * 1e-6


def _link(plan: Plan, gpu: GPU, span: int) -> Tuple[float, float]:
    """(bandwidth B/s, latency s) for a group spanning ``span`` consecutive ranks."""
    if span <= gpu.gpus_per_node:
        return gpu.nvlink_gb_s * 1e9 * gpu.link_efficiency, gpu.nvlink_latency_us * 1e-6
    return gpu.ib_gb_s * 1e9 * gpu.link_efficiency, gpu.ib_latency_us * 1e-6


def step_time(plan: Plan, gpu: GPU, overlap: Overlap = Overlap()) -> Dict[str, float]:
    """Seconds per optimizer step, by part, and the throughput they give."""
    dtype = 2 if plan.bf16 else 4
    T = plan.seq * plan.micro_batch
    s = plan.shape
    head_gemm = _gemm_time(T, s.hidden, s.vocab / plan.tp, gpu, dtype)
    loss_elem = 3 * 4 * s.vocab / plan.tp * T / (gpu.hbm_tb_s * 1e12)
    stages = []
    for stage in range(plan.pp):
        again = set(recomputed_layers(plan, stage))
        parts = [layer_times(plan, gpu, i, i in again) for i in plan.stage_layers(stage)]
        comp = sum(p["forward"] + p["backward"] + p["recompute"] for p in parts)
        fwd = sum(p["forward"] for p in parts)
        bwd = sum(p["backward"] + p["recompute"] for p in parts)
        tp = sum(p["tp_comm"] for p in parts) * overlap.tp_exposed
        if stage == plan.pp - 1:
            comp += 3 * head_gemm + 3 * loss_elem
            bwd += 2 * head_gemm
        stages.append(dict(compute=comp, forward=fwd, backward=bwd, tp_comm=tp))
    p2p, v = 0.0, plan.chunks_per_rank
    if plan.pp > 1:  # per micro-batch: v boundaries, each an activation and a gradient
        bw, lat = _link(plan, gpu, plan.tp * plan.pp)
        p2p = v * 2 * (lat + payload_elements_per_token(plan) * T * dtype / bw)
    slowest = max(stages, key=lambda d: d["compute"] + d["tp_comm"])
    per_mb = slowest["compute"] + slowest["tp_comm"] + p2p
    m = plan.microbatches
    slots = m + (plan.pp - 1) / v  # in micro-batches of the slowest rank
    pipeline = slots * per_mb
    bubble = (plan.pp - 1) / v * per_mb

    params = max(stage_params(plan, i) for i in range(plan.pp))
    dp_time = 0.0
    if plan.dp > 1:
        bw, lat = _link(plan, gpu, plan.gpus)
        d = plan.dp
        hops = 2 * math.ceil(math.log2(d)) * lat
        if plan.distributed_optimizer:
            rs = (d - 1) / d * params * 4 / bw + hops / 2
            ag = (d - 1) / d * params * 2 / bw + hops / 2
        else:
            rs, ag = 2 * (d - 1) / d * params * 4 / bw + hops, 0.0
        if overlap.dp_overlap:
            dp_time = max(0.0, rs - slowest["backward"]) + max(0.0, ag - slowest["forward"])
        else:
            dp_time = rs + ag
    owned = params / plan.dp if plan.distributed_optimizer else params
    optim = owned * 30 / (gpu.hbm_tb_s * 1e12)
    total = pipeline + dp_time + optim
    tokens = plan.global_batch * plan.seq
    model_flops = flops_per_token(s, plan.rank, plan.seq)["training"]
    tok_s = tokens / total
    return dict(step_s=total, pipeline_s=pipeline, bubble_s=bubble, p2p_s=p2p * slots,
                tp_comm_s=slowest["tp_comm"] * m, dp_exposed_s=dp_time, optimizer_s=optim,
                compute_s=slowest["compute"] * m, tokens_per_s=tok_s,
                tokens_per_s_per_gpu=tok_s / plan.gpus,
                mfu=model_flops * tok_s / (plan.gpus * gpu.peak_tflops * 1e12),
                bubble_fraction=(plan.pp - 1) / (v * m + plan.pp - 1))
