"""Memory per GPU, by part, for the most loaded pipeline stage.

* weights, gradients and optimizer states: bf16 weights (2 B), fp32 gradient buffer (4 B,
  Megatron DDP's ``grad_reduce_in_fp32``), fp32 master weights + Adam moments (12 B) divided
  over DP by the distributed optimizer; fp32 training: 4 + 4 + 8 B;
* activations: per micro-batch (``model.stage_activation_elements``) times the micro-batches in
  flight (1F1B: stage i holds min(PP - i, M)), plus the layer being recomputed in backward, plus
  the logits on the last stage;
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


def pipeline_held_bytes(plan: Plan, stage: int) -> float:
    """Stage-boundary tensors a stage holds for backward at its peak: the received inputs of
    its micro-batches in flight (none on the first stage; sent outputs are deallocated)."""
    if plan.pp == 1 or stage == 0:
        return 0.0
    tokens = plan.seq * plan.micro_batch
    in_flight = min(plan.pp - stage, plan.microbatches)
    return payload_elements_per_token(plan) * tokens * (2 if plan.bf16 else 4) * in_flight


def stage_memory(plan: Plan, stage: int) -> Dict[str, float]:
    """Bytes on one GPU of ``stage``, by part."""
    dtype = 2 if plan.bf16 else 4
    tokens = plan.seq * plan.micro_batch
    params = stage_params(plan, stage)
    per = state_bytes_per_param(plan)
    in_flight = min(plan.pp - stage, plan.microbatches)
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
