"""Memory per GPU, by part, for the most loaded pipeline stage.

* weights, gradients and optimizer states: bf16 weights (2 B), fp32 gradient buffer (4 B,
  Megatron DDP's ``grad_reduce_in_fp32``), fp32 master weights + Adam moments (12 B) divided
  over DP by the distributed optimizer; fp32 training: 4 + 4 + 8 B;
* activations: per micro-batch (``per_rank.stage_activation_elements``) times the micro-batches
  in flight (``in_flight``: 1F1B's stage i holds min(PP - i, M); the interleaved schedule holds
  its warm-up's chunk-micro-batches, each 1/v of the stage), plus the layer being recomputed in
  backward, plus the logits on the last stage;
* pipeline buffers: the received stage inputs kept for backward (one per micro-batch in flight,
  on every stage but the first; a stage's sent outputs keep only their graph,
  ``deallocate_pipeline_outputs``) and a send and a receive buffer, each ``payload_width`` wide
  (the residual stream and, for CR-Net, the packed chains);
* a framework allowance: CUDA context, cuBLAS/NCCL workspaces and allocator fragmentation,
  stated as ``ALLOWANCE_GIB + ALLOWANCE_FRACTION`` of the tensors.
"""

from __future__ import annotations

from typing import Dict

from crnet_megatron.analysis.counting import payload_width
from crnet_megatron.planner.per_rank import (
    Plan,
    logits_bytes_per_token,
    stage_activation_elements,
    stage_params,
    working_layer_elements,
)

GIB = 2 ** 30
ALLOWANCE_GIB = 2.5
ALLOWANCE_FRACTION = 0.05


def state_bytes_per_param(plan: Plan) -> Dict[str, float]:
    if plan.bf16:
        weights, grads, optim = 2.0, 4.0, 12.0
    else:
        weights, grads, optim = 4.0, 4.0, 8.0
    if plan.distributed_optimizer:
        optim /= plan.dp
    return dict(weights=weights, gradients=grads, optimizer=optim)


def payload_elements_per_token(plan: Plan) -> float:
    """Stage-boundary tensor elements per token of the sequence on one rank
    (``counting.payload_width`` per row; under SP a row is ``tp`` tokens)."""
    return payload_width(plan.shape, plan.tp, plan.sp) / (plan.tp if plan.sp else 1)


def in_flight_chunks(plan: Plan, stage: int) -> int:
    """Chunk-micro-batches (a micro-batch's forward through one model chunk) whose activations
    rank ``stage`` holds at its peak: Megatron's warm-up forwards plus the first steady one.
    1F1B: min(PP - stage, M). Interleaved (v chunks, groups of PP micro-batches):
    min(2 (PP - stage - 1) + (v - 1) PP + 1, v M)."""
    m, v = plan.microbatches, plan.chunks_per_rank
    if plan.pp == 1:
        return min(1, m)
    if v == 1:
        return min(plan.pp - stage, m)
    return min(2 * (plan.pp - stage - 1) + (v - 1) * plan.pp + 1, v * m)


def pipeline_held_bytes(plan: Plan, stage: int) -> float:
    """Stage-boundary tensors a stage holds for backward at its peak: the received inputs of
    its chunk-micro-batches in flight (the schedule runs chunk ``(k // PP) % v`` k-th; rank 0's
    first chunk receives none; sent outputs are deallocated)."""
    if plan.pp == 1:
        return 0.0
    held = in_flight_chunks(plan, stage)
    if stage == 0:  # rank 0's first chunk receives nothing: count the warm-up's other chunks
        held = sum(1 for k in range(held) if (k // plan.pp) % plan.chunks_per_rank)
    tokens = plan.seq * plan.micro_batch
    return payload_elements_per_token(plan) * tokens * (2 if plan.bf16 else 4) * held


def stage_memory(plan: Plan, stage: int) -> Dict[str, float]:
    """Bytes on one GPU of ``stage``, by part."""
    dtype = 2 if plan.bf16 else 4
    tokens = plan.seq * plan.micro_batch
    params = stage_params(plan, stage)
    per = state_bytes_per_param(plan)
    in_flight = in_flight_chunks(plan, stage) / plan.chunks_per_rank  # in stage micro-batches
    act = stage_activation_elements(plan, stage) * tokens * dtype * in_flight
    act += working_layer_elements(plan, stage) * tokens * dtype
    logits = logits_bytes_per_token(plan) * tokens if stage == plan.pp - 1 else 0.0
    p2p = 0.0
    if plan.pp > 1:  # + a send and a receive buffer
        p2p = pipeline_held_bytes(plan, stage) + payload_elements_per_token(plan) * tokens * dtype * 2
    parts = dict(weights=params * per["weights"], gradients=params * per["gradients"],
                 optimizer=params * per["optimizer"], activations=act, logits=logits,
                 pipeline_buffers=p2p)
    tensors = sum(parts.values())
    parts["framework"] = ALLOWANCE_GIB * GIB + ALLOWANCE_FRACTION * tensors
    parts["total"] = tensors + parts["framework"]
    parts["params"] = params
    return parts


def plan_memory(plan: Plan) -> Dict[str, float]:
    """The most loaded stage's breakdown (and which stage it is)."""
    stages = [stage_memory(plan, i) for i in range(plan.pp)]
    worst = max(range(plan.pp), key=lambda i: stages[i]["total"])
    return dict(stages[worst], stage=worst)
