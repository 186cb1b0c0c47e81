"""What one GPU holds: parameters per rank, and the activations autograd keeps per token.

Per-rank parameters follow the sharding of ``linears.py`` and Megatron's dense linears (column
A factors replicated over TP, row B factors replicated, everything else split). Activations are
counted tensor by tensor as the local spec saves them (``crnet-bench recompute`` measures the
same with ``saved_tensors_hooks``; ``tests/test_planner.py`` compares the two), in elements per
token of one micro-batch; ``H`` marks hidden-wide tensors, which sequence parallelism splits:

* dense layer: per norm its input, rstd and output (2H + 1; 3H + 1 for torch's RMSNorm on
  CPU, which is unfused); attention: q and k after RoPE, v as a view of the fused qkv output
  (so that whole output, q + 2kv), the output (= the output projection's input): 3q + 3kv,
  plus the log-sum-exp (one fp32 per head) and RoPE's cos/sin per position; SwiGLU: the fc1
  output (gate | up), silu(gate) and the product 4f;
* a low-rank layer adds its codes: 5r for the column positions (gathered over the sequence,
  replicated) and 2r for the row positions (split under SP);
* a CR-Net layer also keeps the incoming o and down chains (2H) for dbeta; the qkv and fc1
  chains are outputs the previous layer keeps anyway (attention's v and SwiGLU's gate/up
  views hold them), so they cost nothing more;
* Megatron ``full`` keeps each checkpoint's input (H) and incoming chains (``uniform``: one
  checkpoint per ``recompute_num_layers`` layers; ``block``: the first ``recompute_num_layers``
  layers each checkpointed on its own, the rest keep everything); ``selective`` (core
  attention) saves only the log-sum-exp, as flash attention keeps no score matrix; ``crnet``
  (Algorithm 1) keeps layer inputs, each rank's own codes (7r, split under SP) and the chains
  at its checkpoint layers (``counting.recompute_saved_elements``).
  With ``full``/``crnet`` one layer's activations are live again during its backward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

from crnet_megatron.analysis.counting import (
    ModelShape,
    chain_width,
    checkpoint_set,
    layer_ranks,
)
from crnet_megatron.model import positions
from crnet_megatron.model.stages import rank_chunks

RECOMPUTE_MODES = ("none", "selective", "full", "crnet")


@dataclass(frozen=True)
class Plan:
    """A model and one parallel layout."""

    shape: ModelShape
    rank: object                  # int, per-layer list, or None
    seq: int
    tp: int = 1
    pp: int = 1
    dp: int = 1
    micro_batch: int = 1
    global_batch: int = 8
    sequence_parallel: Optional[bool] = None  # default: on when tp > 1
    recompute: str = "none"
    recompute_method: str = "uniform"  # Megatron's, for recompute="full": "uniform" | "block"
    recompute_num_layers: int = 1
    distributed_optimizer: bool = True
    bf16: bool = True
    every: int = 8
    # "te": TE's fused norms; "local": torch.nn.RMSNorm, fused on CUDA (like TE, 2 tensors saved
    # per norm) and unfused on CPU (3): ``device`` says which path the local spec takes
    backend: str = "te"
    device: str = "cuda"
    vpp: Optional[int] = None  # model chunks per pipeline rank (interleaved schedule)
    first_stage_layers: Optional[int] = None  # uneven stages (Megatron's names, without them
    last_stage_layers: Optional[int] = None   # the layers split evenly)

    @property
    def sp(self) -> bool:
        return self.tp > 1 if self.sequence_parallel is None else bool(self.sequence_parallel)

    @property
    def microbatches(self) -> int:
        return self.global_batch // (self.micro_batch * self.dp)

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def ranks(self) -> List[Optional[int]]:
        return layer_ranks(self.shape, self.rank)

    @property
    def chunks_per_rank(self) -> int:
        return self.vpp or 1

    def chunks(self, stage: int) -> List[List[int]]:
        """The 0-based global layers of each model chunk of pipeline rank ``stage``."""
        return rank_chunks(self.shape.layers, self.pp, self.vpp, stage, self.first_stage_layers,
                           self.last_stage_layers)

    def stage_layers(self, stage: int) -> List[int]:
        return [i for chunk in self.chunks(stage) for i in chunk]


def layer_params_per_rank(shape: ModelShape, rank: Optional[int], tp: int) -> int:
    """One layer's parameters on one TP rank: dense weights split; a column position's A
    replicated and B split on h_out; a row position's A split on h_in and B replicated."""
    norms = 2 * shape.hidden
    if rank is None:
        return sum(i * o for _, i, o in shape.projections()) // tp + norms
    n = 0
    for pos, (_, h_in, h_out) in zip(positions.POSITIONS, shape.projections()):
        n += (h_in * rank + rank * h_out // tp if pos.kind == "column"
              else h_in // tp * rank + rank * h_out)
    return n + (7 if shape.chained else 0) + norms


def stage_params(plan: Plan, stage: int) -> int:
    """Parameters on one rank of pipeline stage ``stage``."""
    s, ranks = plan.shape, plan.ranks
    n = sum(layer_params_per_rank(s, ranks[i], plan.tp) for i in plan.stage_layers(stage))
    if stage == 0:
        n += s.vocab * s.hidden // plan.tp
    if stage == plan.pp - 1:
        n += s.vocab * s.hidden // plan.tp + s.hidden
    return n


def layer_activation_elements(plan: Plan, layer: int, mode: Optional[str] = None) -> float:
    """Elements per token one rank keeps for ``layer`` (0-based) with no recompute (or
    ``mode='selective'``); the log-sum-exp counted in elements of the model dtype."""
    s, t = plan.shape, plan.tp
    H = s.hidden / t if plan.sp else s.hidden
    q, kv, f = s.q_size / t, s.kv_size / t, s.ffn / t
    heads = s.heads / t
    lse = heads * (2 if plan.bf16 else 1)  # fp32 per head
    rope = 4 * s.q_size / s.heads / plan.micro_batch  # cos, sin for q and k, per position
    n = 2 * norm_elements(plan) + 3 * q + 3 * kv + lse + rope + 4 * f
    if (mode or plan.recompute) == "selective":  # flash attention keeps no s x s scores:
        n -= lse  # recomputing it drops only the log-sum-exp (its inputs stay for the checkpoint)
    r = plan.ranks[layer]
    if r is not None:
        n += 5 * r + 2 * (r / t if plan.sp else r)
        if s.chained:  # incoming o and down chains (the previous layer keeps qkv and fc1)
            n += 2 * H
    return n


def norm_elements(plan: Plan) -> float:
    """Per token, what one RMSNorm and the linear after it keep: input, rstd and output (TE's
    fused norm, and torch's RMSNorm on CUDA, whose fused kernel saves only input and rstd),
    plus the normalised input for torch's unfused RMSNorm on CPU."""
    s, t = plan.shape, plan.tp
    H = s.hidden / t if plan.sp else s.hidden
    unfused = plan.backend == "local" and plan.device == "cpu"
    return (3 if unfused else 2) * H + 1


def chain_elements(plan: Plan) -> float:
    """Elements per token of one layer's four outgoing chains, on one rank."""
    s, t = plan.shape, plan.tp
    H = s.hidden / t if plan.sp else s.hidden
    return (chain_width(s) - 2 * s.hidden) / t + 2 * H  # qkv/fc1 sharded; o/down residual layout


def stage_activation_elements(plan: Plan, stage: int) -> float:
    """Elements per token one rank keeps for the decoder layers of one micro-batch in its
    stage (every model chunk of it), under the plan's recompute mode (without the backward's
    working layer)."""
    return sum(chunk_activation_elements(plan, chunk) for chunk in plan.chunks(stage))


def chunk_activation_elements(plan: Plan, layers: List[int]) -> float:
    """The same for one model chunk (a stage under 1F1B): recompute runs per chunk, whose
    incoming and outgoing chains are a stage boundary's."""
    s, t = plan.shape, plan.tp
    H = s.hidden / t if plan.sp else s.hidden
    mode = plan.recompute
    chains = s.chained
    if mode in ("none", "selective"):
        return sum(layer_activation_elements(plan, i, mode) for i in layers)
    if mode == "full":
        checkpoints, kept = _full_checkpoints(plan, layers)
        carried = sum(1 for c in checkpoints if c[0] > 0) if chains else 0
        n = len(checkpoints) * H + carried * chain_elements(plan)
        if kept and chains and kept[0] > 0:  # its qkv/fc1 chains: no kept layer below holds them
            n += chain_elements(plan) - 2 * H
        return n + sum(layer_activation_elements(plan, i, "none") for i in kept)
    if mode == "crnet":
        ranks = plan.ranks
        # Algorithm 1 stores each rank's own codes (a sequence shard under SP: the column
        # codes are gathered again in backward)
        codes = sum(7 * (ranks[i] / t if plan.sp else ranks[i])
                    for i in layers if ranks[i] is not None)
        stored = len(checkpoint_set([ranks[i] is None for i in layers], plan.every,
                                    first=layers[0], num_layers=s.layers))
        return len(layers) * H + codes + stored * chain_elements(plan)
    raise ValueError(f"recompute mode {mode!r}: one of {RECOMPUTE_MODES}")


def _full_checkpoints(plan: Plan, layers: List[int]) -> Tuple[List[List[int]], List[int]]:
    k = max(1, plan.recompute_num_layers)
    if plan.recompute_method == "block":
        return [[i] for i in layers[:k]], layers[k:]
    return [layers[j:j + k] for j in range(0, len(layers), k)], []


def full_recompute_chunks(plan: Plan, stage: int) -> Tuple[List[List[int]], List[int]]:
    """(the layers of each checkpoint, the layers run without one) of a stage under Megatron
    ``full`` recompute, as ``parallel.recompute.megatron_full_recompute`` runs them in each
    model chunk."""
    parts = [_full_checkpoints(plan, chunk) for chunk in plan.chunks(stage)]
    return [c for p in parts for c in p[0]], [i for p in parts for i in p[1]]


def recomputed_layers(plan: Plan, stage: int) -> List[int]:
    """The layers whose forward runs again in backward (``full``: the checkpointed ones)."""
    if plan.recompute == "full":
        return [i for chunk in full_recompute_chunks(plan, stage)[0] for i in chunk]
    return list(plan.stage_layers(stage)) if plan.recompute == "crnet" else []


def working_layer_elements(plan: Plan, stage: int) -> float:
    """Activations live again while ``full``/``crnet`` recompute: one checkpoint's layers
    (Algorithm 1: one layer)."""
    if plan.recompute == "full":
        chunks = full_recompute_chunks(plan, stage)[0]
        return max((sum(layer_activation_elements(plan, i, "none") for i in c) for c in chunks),
                   default=0.0)
    if plan.recompute != "crnet":
        return 0.0
    return max(layer_activation_elements(plan, i, "none") for i in plan.stage_layers(stage))


def logits_bytes_per_token(plan: Plan) -> float:
    """Last stage: the final norm and the fp32 softmax of the vocabulary-parallel cross
    entropy."""
    return norm_elements(plan) * (2 if plan.bf16 else 4) + 4 * plan.shape.vocab / plan.tp
