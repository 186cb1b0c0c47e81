"""How every parameter of the model is laid out across tensor-parallel ranks.

``shard_for_tp`` cuts a full (TP=1) tensor into rank ``r``'s shard; ``tp_split_dim`` names the
rule. Used by tests (TP parity) and for loading weights across TP layouts.
"""

from __future__ import annotations

from typing import Optional

import torch

_COLUMN_OUT = ("linear_qkv.weight", "linear_b.q.weight", "linear_b.k.weight", "linear_b.v.weight",
               "linear_b.gate.weight", "linear_b.up.weight", "word_embeddings.weight",
               "output_layer.weight")


def tp_split_dim(name: str) -> Optional[str]:
    """'out' (dim 0), 'in' (dim 1), 'glu' (gate|up halves, dim 0 each) or None (replicated)."""
    if name.endswith("mlp.linear_fc1.weight"):
        return "glu"
    if any(name.endswith(s) for s in _COLUMN_OUT):
        return "out"
    if name.endswith(("linear_qkv.linear_a.weight", "linear_fc1.linear_a.weight")):
        return None  # the stacked column A factors are replicated (linears.SharedFactor)
    if name.endswith(("linear_proj.weight", "linear_fc2.weight", "linear_proj.linear_a.weight",
                      "linear_fc2.linear_a.weight")):
        return "in"
    return None


def shard_for_tp(name: str, full: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    rule = tp_split_dim(name)
    if rule is None or tp_size == 1:
        return full
    if rule == "out":
        return full.chunk(tp_size, 0)[tp_rank]
    if rule == "in":
        return full.chunk(tp_size, 1)[tp_rank]
    gate, up = full.chunk(2, 0)
    return torch.cat([gate.chunk(tp_size, 0)[tp_rank], up.chunk(tp_size, 0)[tp_rank]], 0)
