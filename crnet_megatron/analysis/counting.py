"""Parameter and FLOP counts for dense and CR-Net LLaMA models, per layer and total.

One place for the arithmetic that the model (a built model must match it), the trainer
(throughput, MFU) and the tools (calculator, benchmarks) use. FLOPs count a multiply-add as 2;
training = 3 x forward (backward = 2 x forward); attention scores and values are counted
without a causal discount (torchtitan's and Megatron's convention).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence, Set

from crnet_megatron.model import positions


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    ffn: int
    heads: int
    layers: int
    vocab: int
    groups: Optional[int] = None
    head_dim: Optional[int] = None
    dense_layers: int = 1
    variant: str = "crnet"  # or the baselines "lowrank" (no betas, no chain add) and "dense"

    @property
    def q_size(self) -> int:
        return self.heads * (self.head_dim or self.hidden // self.heads)

    @property
    def kv_size(self) -> int:
        return (self.groups or self.heads) * (self.head_dim or self.hidden // self.heads)

    def projections(self):
        """(name, h_in, h_out) of the 7 positions."""
        return positions.shapes(self.hidden, self.ffn, self.q_size, self.kv_size)

    @classmethod
    def from_config(cls, config, vocab: int) -> "ModelShape":
        return cls(hidden=config.hidden_size, ffn=config.ffn_hidden_size,
                   heads=config.num_attention_heads, layers=config.num_layers, vocab=vocab,
                   groups=config.num_query_groups, head_dim=config.kv_channels,
                   dense_layers=config.num_dense_layers, variant=config.crnet_variant)

    def as_variant(self, variant: str) -> "ModelShape":
        """The same shape as another variant (the dense one has only dense layers)."""
        dense_layers = self.layers if variant == "dense" else (
            self.dense_layers if self.dense_layers < self.layers else 1)
        return replace(self, variant=variant, dense_layers=dense_layers)

    @property
    def chained(self) -> bool:
        return self.variant == "crnet"


# LLaMA shapes of the paper's protocol (crnet_method.md §3.1).
LLAMA_SHAPES = {
    "60m": ModelShape(512, 1376, 8, 8, 32000),
    "130m": ModelShape(768, 2048, 12, 12, 32000),
    "350m": ModelShape(1024, 2736, 16, 24, 32000),
    "1b": ModelShape(2048, 5461, 32, 24, 32000),
    "7b": ModelShape(4096, 11008, 32, 32, 32000),
    "13b": ModelShape(5120, 13824, 40, 40, 32000),
}


def layer_ranks(shape: ModelShape, rank) -> List[Optional[int]]:
    """Per layer: None for dense layers, the rank for CR-Net layers. ``rank=None`` = all dense."""
    n = shape.layers - shape.dense_layers
    if rank is None or shape.variant == "dense":
        return [None] * shape.layers
    ranks = list(rank) if isinstance(rank, (list, tuple)) else [rank] * n
    if len(ranks) != n:
        raise ValueError(f"rank list has {len(ranks)} entries, expected {n} (CR-Net layers)")
    return [None] * shape.dense_layers + ranks


def layer_params(shape: ModelShape, rank: Optional[int]) -> int:
    """Parameters of one layer: 7 projections (+ 7 betas if CR-Net) + 2 RMSNorm weights."""
    norms = 2 * shape.hidden
    if rank is None:
        return sum(i * o for _, i, o in shape.projections()) + norms
    betas = 7 if shape.chained else 0
    return sum((i + o) * rank for _, i, o in shape.projections()) + betas + norms


def count_params(shape: ModelShape, rank=None) -> Dict:
    """Total and per-layer parameters; untied embedding and output layer, final norm."""
    per_layer = [layer_params(shape, r) for r in layer_ranks(shape, rank)]
    embedding = output = shape.vocab * shape.hidden
    total = sum(per_layer) + embedding + output + shape.hidden
    return dict(per_layer=per_layer, embedding=embedding, output_layer=output,
                final_norm=shape.hidden, total=total)


def layer_linear_flops(shape: ModelShape, rank: Optional[int]) -> int:
    """Forward FLOPs per token of one layer's 7 projections (+ the CR-Net chain scale-add)."""
    if rank is None:
        return sum(2 * i * o for _, i, o in shape.projections())
    add = 2 if shape.chained else 0  # the chain's scale and add
    return sum(2 * (i + o) * rank + add * o for _, i, o in shape.projections())


def flops_per_token(shape: ModelShape, rank=None, seq_len: int = 256) -> Dict:
    """Forward and training FLOPs per token, and the decoder-linear part on its own."""
    linear = sum(layer_linear_flops(shape, r) for r in layer_ranks(shape, rank))
    attention = shape.layers * 4 * seq_len * shape.q_size  # QK^T and AV
    head = 2 * shape.vocab * shape.hidden
    forward = linear + attention + head
    return dict(linear_forward=linear, attention_forward=attention, output_forward=head,
                forward=forward, training=3 * forward)


def summary(shape: ModelShape, rank, seq_len: int = 256) -> Dict:
    """CR-Net vs dense side by side: the numbers the calculator and the trainer print."""
    cr_p, dn_p = count_params(shape, rank)["total"], count_params(shape, None)["total"]
    cr_f, dn_f = flops_per_token(shape, rank, seq_len), flops_per_token(shape, None, seq_len)
    return dict(params=cr_p, dense_params=dn_p, param_ratio=cr_p / dn_p,
                training_flops_per_token=cr_f["training"],
                dense_training_flops_per_token=dn_f["training"],
                linear_flop_ratio=cr_f["linear_forward"] / dn_f["linear_forward"])


def pipeline_boundary(shape: ModelShape, seq_len: int, micro_batch_size: int, tp: int = 1,
                      sequence_parallel: bool = False, dtype_bytes: int = 2) -> Dict:
    """Bytes one stage sends per micro-batch (forward; backward sends the same in gradients),
    per TP rank: dense = the residual stream; CR-Net = residual + the four fused chains."""
    rows = seq_len * micro_batch_size // (tp if sequence_parallel else 1)
    dense = rows * shape.hidden * dtype_bytes
    crnet = rows * payload_width(shape, tp, sequence_parallel) * dtype_bytes
    return dict(dense_bytes=dense, crnet_bytes=crnet, ratio=crnet / dense)


def payload_width(shape: ModelShape, tp: int = 1, sequence_parallel: bool = False) -> int:
    """Width of the packed stage-boundary tensor per TP rank (``positions.payload_parts``)."""
    return positions.packed_width(positions.payload_parts(
        shape.hidden, shape.ffn, shape.q_size, shape.kv_size, tp, sequence_parallel,
        shape.chained))


def checkpoint_set(dense: Sequence[bool], every: int, first: int = 0,
                   num_layers: Optional[int] = None) -> Set[int]:
    """Algorithm 1's A: the indices (within a stage or model chunk of ``len(dense)`` layers,
    the first being global layer index ``first`` of ``num_layers``) whose chain outputs Y are
    stored: the stage's last layer (its chains leave it), and every layer whose global index
    is a multiple of ``every`` layers before the model's last, never a dense layer. So the set
    follows the global layer order whatever the pipeline cut; one stage of all n layers gets
    |A| = ceil(n / every) when all are CR-Net."""
    n = len(dense)
    last = (first + n if num_layers is None else num_layers) - 1
    return {n - 1} | {i for i in range(n) if not dense[i] and (last - first - i) % every == 0}


def checkpoint_count(layers: int, dense_layers: int, every: int) -> int:
    """|A| for ``layers`` layers of which the first ``dense_layers`` are dense."""
    return len(checkpoint_set([i < dense_layers for i in range(layers)], every))


def chain_width(shape: ModelShape) -> int:
    """Elements per token of one layer's seven chain outputs (5h + 2h_ff for LLaMA MHA)."""
    return positions.chain_width(shape.hidden, shape.ffn, shape.q_size, shape.kv_size)


def recompute_saved_elements(shape: ModelShape, rank, mode: str, every: int = 8) -> int:
    """Per token, elements the decoder layers keep for backward under a recompute mode.

    full: Megatron per-layer checkpoints of the residual stream and incoming chains.
    crnet: Algorithm 1 (block inputs, 7 codes of r per CR-Net layer, Y at |A| layers).
    """
    ranks = layer_ranks(shape, rank)
    crnet_layers = [r for r in ranks if r is not None]
    if mode == "full":
        chains = (shape.layers - 1) * chain_width(shape) if shape.chained else 0
        return shape.layers * shape.hidden + chains
    if mode == "crnet":
        a = checkpoint_count(shape.layers, shape.dense_layers, every)
        return (shape.layers * shape.hidden + 7 * sum(crnet_layers)
                + a * chain_width(shape))
    raise ValueError(f"mode={mode!r}: expected 'full' or 'crnet'")


def recompute_flops(shape: ModelShape, rank, mode: str, seq_len: int, every: int = 8) -> int:
    """Per token, FLOPs spent in backward re-creating activations.

    full: one more forward of every layer. selective: core attention again. crnet: one Z B
    matmul per position of each layer whose Y is inverted, core attention of every layer, and
    the dense layers' projections (recomputed as they are); norms and SwiGLU are elementwise.
    """
    ranks = layer_ranks(shape, rank)
    attention = 4 * seq_len * shape.q_size
    if mode == "full":
        return sum(layer_linear_flops(shape, r) for r in ranks) + shape.layers * attention
    if mode == "selective":
        return shape.layers * attention
    if mode == "crnet":
        n = shape.layers
        stored = checkpoint_set([r is None for r in ranks], every)
        inverse = sum(sum(2 * ranks[i] * o for _, _, o in shape.projections())
                      for i in range(1, n) if ranks[i] is not None and (i - 1) not in stored)
        dense = sum(layer_linear_flops(shape, r) for r in ranks if r is None)
        return inverse + dense + n * attention
    raise ValueError(f"mode={mode!r}: expected 'full', 'selective' or 'crnet'")


def tp_layer_comm(hidden: int, rank: Optional[int], tp: int, sequence_parallel: bool,
                  tokens: int) -> Dict[str, int]:
    """Full-tensor elements of one layer's TP collectives per micro-batch, forward + backward,
    by kind (``comm_counter.CommCounter`` measures the same); ``rank=None`` is the dense layer.

    Dense (Megatron): each column linear all-reduces dX (T h) in backward and each row linear
    all-reduces its output (T h) in forward; under SP the column gathers X in forward and again
    for its weight gradient and reduce-scatters dX, the row reduce-scatters its output and
    gathers dY. CR-Net: the column A factors are replicated, so only the codes cross ranks
    (T n r, n = 3 for qkv, 2 for fc1): all-reduced dZ in backward, or under SP gathered along
    the sequence in forward and reduce-scattered in backward; the row reduces only T r (and
    gathers T r back under SP). No scalar collective: the column betas' partial gradients are
    summed once per step (``layer_collective_calls``; not counted here, nor the once-per-step
    TP sum of the norms, A, row B and betas under SP).
    """
    if tp == 1:
        return {}
    h, t = hidden, tokens
    if rank is None:
        return (dict(all_gather=6 * t * h, reduce_scatter=4 * t * h) if sequence_parallel
                else dict(all_reduce=4 * t * h))
    codes, row = 5 * rank * t, 2 * rank * t
    if sequence_parallel:
        return dict(all_gather=codes + row, reduce_scatter=codes + row)
    return dict(all_reduce=codes + row)


def layer_collective_calls(sequence_parallel: bool, dense: bool) -> Dict[str, int]:
    """TP collective calls of one layer per micro-batch, forward + backward (TP > 1).

    Without SP both layers make 4 all-reduces (dense: dX of the two column linears, the two row
    outputs; CR-Net: dZ of the two column codes, the two r-wide row codes). Under SP the dense
    layer gathers X for each column linear in forward and again for its weight gradient,
    reduce-scatters dX, reduce-scatters each row output and gathers dY: 6 + 4; CR-Net's codes
    are gathered once (forward) and reduce-scattered once (backward) per linear: 4 + 4."""
    if not sequence_parallel:
        return dict(all_reduce=4)
    return dict(all_gather=6, reduce_scatter=4) if dense else dict(all_gather=4,
                                                                   reduce_scatter=4)


def comm_wire_bytes(elements: Dict[str, int], tp: int, dtype_bytes: int) -> float:
    """Bytes one rank sends for ``elements`` under the ring algorithm."""
    factor = {"all_reduce": 2.0, "all_gather": 1.0, "reduce_scatter": 1.0}
    return sum(factor[k] * (tp - 1) / tp * n * dtype_bytes for k, n in elements.items())
