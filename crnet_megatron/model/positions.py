"""The seven projection positions of a LLaMA layer, stated once (no torch: the planner reads it).

Each position has a CR-Net chain of its own. Megatron fuses them into four modules, which are
also the four chain tensors between layers (``layer.Chains``) in this order:

==========  ===========================  ======  ========  =====================  ======
position    Megatron module              slot    TP kind   HF name                width
==========  ===========================  ======  ========  =====================  ======
q           self_attention.linear_qkv    0       column    self_attn.q_proj       h -> q
k           self_attention.linear_qkv    1       column    self_attn.k_proj       h -> kv
v           self_attention.linear_qkv    2       column    self_attn.v_proj       h -> kv
o           self_attention.linear_proj   0       row       self_attn.o_proj       q -> h
gate        mlp.linear_fc1               0       column    mlp.gate_proj          h -> f
up          mlp.linear_fc1               1       column    mlp.up_proj            h -> f
down        mlp.linear_fc2               0       row       mlp.down_proj          f -> h
==========  ===========================  ======  ========  =====================  ======

with q = heads x head_dim, kv = query groups x head_dim, f = ffn hidden size. Column modules
keep Megatron's fused layouts: ``linear_qkv`` per GQA group ``[q.. k v]`` (``qkv_group_split``),
``linear_fc1`` ``[gate | up]`` per TP rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple


@dataclass(frozen=True)
class Position:
    name: str      # q, k, v, o, gate, up, down
    block: str     # Megatron submodule of the layer: self_attention or mlp
    module: str    # fused Megatron module: linear_qkv, linear_proj, linear_fc1, linear_fc2
    slot: int      # index inside the fused module
    kind: str      # TP kind: column (output sharded) or row (input sharded)
    hf_block: str  # HF Llama submodule: self_attn or mlp
    hf_name: str   # HF Llama module name: q_proj ...
    width_in: str  # symbolic widths: h, q, kv, f
    width_out: str

    @property
    def fused(self) -> str:
        return f"{self.block}.{self.module}"

    @property
    def hf(self) -> str:
        return f"{self.hf_block}.{self.hf_name}"


POSITIONS: Tuple[Position, ...] = (
    Position("q", "self_attention", "linear_qkv", 0, "column", "self_attn", "q_proj", "h", "q"),
    Position("k", "self_attention", "linear_qkv", 1, "column", "self_attn", "k_proj", "h", "kv"),
    Position("v", "self_attention", "linear_qkv", 2, "column", "self_attn", "v_proj", "h", "kv"),
    Position("o", "self_attention", "linear_proj", 0, "row", "self_attn", "o_proj", "q", "h"),
    Position("gate", "mlp", "linear_fc1", 0, "column", "mlp", "gate_proj", "h", "f"),
    Position("up", "mlp", "linear_fc1", 1, "column", "mlp", "up_proj", "h", "f"),
    Position("down", "mlp", "linear_fc2", 0, "row", "mlp", "down_proj", "f", "h"),
)
NAMES: Tuple[str, ...] = tuple(p.name for p in POSITIONS)
# the fused modules in ``Chains`` order (qkv, proj, fc1, fc2)
FUSED_MODULES: Tuple[str, ...] = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
# the fused layouts a column module may have, by module
COLUMN_LAYOUTS = {"linear_qkv": "qkv", "linear_fc1": "glu"}


def in_module(module: str) -> List[Position]:
    """The positions of one fused module, in slot order."""
    return [p for p in POSITIONS if p.module == module]


def in_layout(layout: str) -> List[Position]:
    """The positions of a column layout ("qkv" or "glu")."""
    modules = [m for m, lay in COLUMN_LAYOUTS.items() if lay == layout]
    if not modules:
        raise ValueError(f"layout={layout!r}: expected one of {sorted(COLUMN_LAYOUTS.values())}")
    return in_module(modules[0])


def widths(hidden: int, ffn: int, q: int, kv: int) -> Dict[str, int]:
    return {"h": hidden, "f": ffn, "q": q, "kv": kv}


def shapes(hidden: int, ffn: int, q: int, kv: int) -> List[Tuple[str, int, int]]:
    """(name, h_in, h_out) of the seven positions."""
    w = widths(hidden, ffn, q, kv)
    return [(p.name, w[p.width_in], w[p.width_out]) for p in POSITIONS]


def qkv_group_split(heads: int, groups: int, head_dim: int) -> List[int]:
    """Widths of q, k and v inside one GQA group of the fused ``linear_qkv`` output."""
    return [heads // groups * head_dim, head_dim, head_dim]


def chain_width(hidden: int, ffn: int, q: int, kv: int) -> int:
    """Elements per token of one layer's seven chain outputs (5h + 2f for LLaMA MHA)."""
    return sum(o for _, _, o in shapes(hidden, ffn, q, kv))


# the packed stage-boundary tensor's parts, in order: the residual stream, the o/down chains
# (residual layout), then the qkv/fc1 chains (hidden-sharded, full sequence)
PAYLOAD_PARTS = ("hidden", "proj", "fc2", "qkv", "fc1")


def payload_parts(hidden: int, ffn: int, q: int, kv: int, tp: int, sequence_parallel: bool,
                  chained: bool) -> List[Tuple[str, int, int]]:
    """(part, width per TP rank, SP fold) of the packed stage-boundary tensor ``(s', b, W)``
    in packing order (``s' = s / tp`` under SP; W = sum of width x fold). The qkv/fc1 chains
    are full-sequence, so under SP their ``tp`` sequence shards are folded into the width.
    Without chains (lowrank, dense) the payload is the residual stream alone."""
    if not chained:
        return [("hidden", hidden, 1)]
    fold = tp if sequence_parallel else 1
    widths = {"hidden": (hidden, 1), "proj": (hidden, 1), "fc2": (hidden, 1),
              "qkv": ((q + 2 * kv) // tp, fold), "fc1": (2 * ffn // tp, fold)}
    return [(name, *widths[name]) for name in PAYLOAD_PARTS]


def packed_width(parts: List[Tuple[str, int, int]]) -> int:
    """Last dimension of the packed tensor of ``payload_parts``: each width times its fold."""
    return sum(width * fold for _, width, fold in parts)
