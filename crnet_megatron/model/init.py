"""Layout-invariant initialisation: the model is a function of the seed, not of TP x PP.

Megatron draws a rank's weights from streams that depend on the layout (the same seed on every
pipeline stage, per-shard draws on GPU), so the same config at another TP x PP starts from
another model. Here, after construction (as torchtitan's ``init_weights``), every parameter is
drawn again as the TP=1/PP=1 model holds it, from a stream seeded by the run seed and the
parameter's *global* name (``decoder.layers.{global layer}...``), and this rank keeps its shard
(``tp_layout.shard_for_tp``). The distributions are stated once, here:

* embedding, output layer, dense q/k/v and gate/up: N(0, init_method_std);
* dense o and down (Megatron's scaled output init): N(0, init_method_std / sqrt(2 L));
* CR-Net A and B factors: N(0, s) with ``linears._lowrank_std`` per projection position
  (CoLA: Var(AB) ~ 1/(h_in + h_out), or init_method_std);
* norms: 1; beta: ``crnet_beta_init``.
"""

from __future__ import annotations

import hashlib
import math
import re
from typing import Sequence, Union

import torch
from megatron.core import parallel_state

from crnet_megatron.model.config import CRNetConfig
from crnet_megatron.model.linears import (
    CRNetColumnParallelLinear,
    CRNetRowParallelLinear,
    _lowrank_std,
)
from crnet_megatron.model.tp_layout import shard_for_tp, tp_split_dim

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def global_name(model: torch.nn.Module, name: str) -> str:
    """``decoder.layers.{local}.x`` -> ``decoder.layers.{global}.x`` (Megatron's layer_number)."""
    m = _LAYER.match(name)
    if not m:
        return name
    number = model.decoder.layers[int(m.group(1))].layer_number
    return f"decoder.layers.{number - 1}." + name[m.end():]


def _generator(seed: int, name: str, device) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).hexdigest()
    return torch.Generator(device=device).manual_seed(int(digest[:15], 16))


def _full_shape(rule, shape: Sequence[int], tp: int):
    full = list(shape)
    if rule in ("out", "glu"):
        full[0] *= tp
    elif rule == "in":
        full[1] *= tp
    return full


def _std(model, config: CRNetConfig, local: str, tp: int) -> Union[float, torch.Tensor]:
    """The std of a weight: a float, or one per row (stacked CR-Net A factors)."""
    for marker in (".linear_a.", ".linear_b."):
        if marker not in local:
            continue
        module = model.get_submodule(local.split(marker)[0])
        if isinstance(module, CRNetColumnParallelLinear):
            h_in = module.linear_a.weight.shape[1]
            sizes = [getattr(module.linear_b, p).weight.shape[0] * tp for p in module.names]
            stds = [_lowrank_std(config, h_in, s, module.rank) for s in sizes]
            if marker == ".linear_a.":
                return torch.tensor(stds).repeat_interleave(module.rank)[:, None]
            return stds[module.names.index(local.split(marker)[1].split(".")[0])]
        if isinstance(module, CRNetRowParallelLinear):
            h_in = module.linear_a.weight.shape[1] * tp
            return _lowrank_std(config, h_in, module.linear_b.weight.shape[0], module.rank)
    if local.endswith(("self_attention.linear_proj.weight", "mlp.linear_fc2.weight")):
        return config.init_method_std / math.sqrt(2.0 * config.num_layers)
    return config.init_method_std


@torch.no_grad()
def init_weights(model: torch.nn.Module, config: CRNetConfig, seed: int) -> None:
    """Draw every parameter of this rank's model as its shard of the TP=1/PP=1 model."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    for local, param in model.named_parameters():
        name = global_name(model, local)
        if local.endswith(".beta"):
            param.fill_(float(config.crnet_beta_init))
            continue
        if param.ndim == 1:  # RMSNorm weights
            param.fill_(1.0)
            continue
        rule = tp_split_dim(param, name)
        shape = _full_shape(rule, param.shape, tp)
        device = param.device
        full = torch.randn(shape, generator=_generator(seed, name, device), device=device,
                           dtype=torch.float32)
        std = _std(model, config, local, tp)
        full *= std.to(device) if isinstance(std, torch.Tensor) else std
        param.copy_(shard_for_tp(rule, full, tp_rank, tp))
