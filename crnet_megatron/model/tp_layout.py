"""How every parameter of the model is laid out across tensor-parallel ranks.

The layout is read from each parameter's own Megatron attributes (``tensor_model_parallel``,
``partition_dim``, set by the TP layers that own it), so the layers are the one source of
truth. The single layout those attributes cannot express is named: Megatron's gated
``mlp.linear_fc1`` keeps ``[gate | up]`` per rank. ``shard_for_tp`` cuts a full (TP=1) tensor
into rank ``r``'s shard by that rule (initialisation, tests, loading across TP layouts).
"""

from __future__ import annotations

from typing import Dict, Optional

import torch

_GLU = "mlp.linear_fc1.weight"


def tp_split_dim(param: torch.Tensor, name: str = "") -> Optional[str]:
    """'out' (dim 0), 'in' (dim 1), 'glu' (gate|up halves, dim 0 each) or None (replicated)."""
    if not getattr(param, "tensor_model_parallel", False):
        return None
    dim = getattr(param, "partition_dim", 0)
    if dim == 0 and name.endswith(_GLU):
        return "glu"
    return "out" if dim == 0 else "in"


def rules(model: torch.nn.Module) -> Dict[str, Optional[str]]:
    """{parameter name: rule} of a model (as ``named_parameters`` names them)."""
    return {name: tp_split_dim(p, name) for name, p in model.named_parameters()}


def shard_for_tp(rule: Optional[str], full: torch.Tensor, tp_rank: int,
                 tp_size: int) -> torch.Tensor:
    if rule is None or tp_size == 1:
        return full
    if rule == "out":
        return full.chunk(tp_size, 0)[tp_rank]
    if rule == "in":
        return full.chunk(tp_size, 1)[tp_rank]
    gate, up = full.chunk(2, 0)
    return torch.cat([gate.chunk(tp_size, 0)[tp_rank], up.chunk(tp_size, 0)[tp_rank]], 0)
