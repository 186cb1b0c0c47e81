"""Tensor-parallel CR-Net projections: ``Y_l = s(beta_l) * Y_{l-1} + (X_l A_l) B_l``.

Both modules are composed of Megatron-Core's own ``ColumnParallelLinear`` /
``RowParallelLinear`` (the pattern of NeMo's ``ParallelLinearAdapter``) and return
``(output, None)`` like them; the extra argument is the chain input ``Y_{l-1}``.

Sharding (t = tensor-parallel size):

* Column positions (``linear_qkv`` = q, k, v; ``linear_fc1`` = gate, up). The per-position
  factors A_p (h_in x r) are stacked into one ``linear_a`` that is replicated over TP
  (``ReplicatedWeight``, r-sized, small) and applied to the tokens each rank holds; only the r-wide
  codes Z cross ranks: under SP they are all-gathered along the sequence (backward: one
  reduce-scatter of dZ), otherwise dZ is all-reduced in backward and dX = dZ A^T is then
  complete on every rank, so no h-wide collective remains (dense Megatron all-reduces dX, or
  gathers X twice and reduce-scatters dX under SP). Without SP the A matmul is not divided by
  t. Each B_p (r x out_p) is a ColumnParallelLinear sharded on its output dimension exactly
  like Megatron's dense weight and applied as a local matmul, so the output shard, the
  incoming chain shard and the chain add are all local: no extra collective. The fused output
  keeps Megatron's layout (``linear_qkv``: GQA groups ``[q.. k v]``; ``linear_fc1``:
  ``[gate | up]`` per rank); the chain update scales each position by its own s(beta)
  (``chain_ops``).
* Row positions (``linear_proj``, ``linear_fc2``). A (h_in x r) is a RowParallelLinear sharded
  on h_in: the TP reduction is over r channels instead of h_out (an all-reduce, or a
  reduce-scatter along the sequence under sequence parallel). B (r x h_out) is replicated and
  applied after the reduction, and the chain add happens there, exactly once. The o/down chains
  therefore have the residual stream's layout ([s, b, h], or [s/t, b, h] under SP).
* beta is replicated. A column beta sees only part of ``<dY, Y_prev>`` (outputs sharded on
  h_out), so its gradient is partial: it is marked ``partial_over_tp`` and summed over TP once
  per step, not in autograd on every micro-batch (2-3 scalars a call would put ~2 L M
  latency-bound collectives on the compute stream). Under SP a row's B and beta see one
  sequence shard, likewise partial: everything partial carries Megatron's
  ``sequence_parallel`` mark under SP and is summed with the norms in ``finalize_model_grads``;
  without SP the column betas get one coalesced all-reduce of their own
  (``parallel.groups.finalize_grads``; ``sync_partial_grads`` for an unwrapped model).
"""

from __future__ import annotations

import functools
from typing import List, Sequence

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)
from megatron.core.tensor_parallel.mappings import (
    _reduce,
    _reduce_scatter_along_first_dim,
)
from megatron.core.transformer.module import MegatronModule

from crnet_megatron.model import positions
from crnet_megatron.model.chain_ops import chain_add, replay_chain, whole
from crnet_megatron.model.config import CRNetConfig
from crnet_megatron.model.projection import active_scheme
from crnet_megatron.model.replay_ops import gather_seq_grad, replay_linear


def signed_scale(beta: torch.Tensor, eps: float) -> torch.Tensor:
    """s(beta) = sign(beta) * (|beta| + eps): never zero for beta != 0, so the chain inverts."""
    return torch.sign(beta) * (beta.abs() + eps)


def _tp_group(tp_group):
    """The TP group a layer was given (Megatron's layer passes ``pg_collection.tp``), or the
    global one where a module is built on its own."""
    return tp_group if tp_group is not None else parallel_state.get_tensor_model_parallel_group()


def _device(config: CRNetConfig):
    return torch.device("cpu") if config.use_cpu_initialization else torch.cuda.current_device()


def _lowrank_std(config: CRNetConfig, h_in: int, h_out: int, rank: int) -> float:
    """CoLA init: A, B ~ N(0, std^2) with std^4 = 1 / (r (h_in + h_out)) => Var(AB) ~ 1/(h_in+h_out)."""
    if config.crnet_lowrank_init == "cola":
        return (rank * (h_in + h_out)) ** -0.25
    return config.init_method_std


def _make_beta(n: int, config: CRNetConfig):
    """The n chain scales of a projection; None for the lowrank baseline (no chain), frozen at
    their init when ``crnet_learn_beta`` is False."""
    if config.crnet_variant != "crnet":
        return None
    beta = torch.nn.Parameter(torch.full((n,), float(config.crnet_beta_init),
                                         dtype=config.params_dtype, device=_device(config)))
    beta.requires_grad_(bool(config.crnet_learn_beta))
    return beta


def _normal(std: float):
    return lambda t: torch.nn.init.normal_(t, mean=0.0, std=std)


class _Factors(MegatronModule):
    """Named B factors; a MegatronModule so ``sharded_state_dict`` recurses into each
    (``torch.nn.ModuleDict`` would be checkpointed as replicated)."""

    def values(self):
        return list(self._modules.values())

    def __getitem__(self, name: str):
        return self._modules[name]


class ReplicatedWeight(torch.nn.Module):
    """A weight replicated over TP (the stacked column A factors), applied with ``F.linear``.
    Under SP each rank sees only its tokens' gradient, so the weight carries Megatron's
    ``sequence_parallel`` mark and is summed over TP once per step, like the norms."""

    def __init__(self, input_size: int, output_size: int, config: CRNetConfig):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(
            output_size, input_size, dtype=config.params_dtype, device=_device(config)))
        self.weight.sequence_parallel = config.sequence_parallel


class CRNetColumnParallelLinear(MegatronModule):
    """CR-Net ``linear_qkv`` (layout="qkv") or ``linear_fc1`` (layout="glu")."""

    def __init__(self, input_size: int, output_size: int, *, config: CRNetConfig, rank: int,
                 layout: str, gather_output: bool = False, bias: bool = False, tp_group=None,
                 **unused):
        super().__init__(config=config)
        if gather_output or bias:
            raise ValueError("CR-Net column projections keep sharded outputs and have no bias")
        self.tp_group = _tp_group(tp_group)
        t = self.tp_group.size()
        self.rank, self.layout, self.eps = rank, layout, config.crnet_eps
        self.names, sizes = self._positions(config, layout, output_size)
        n = len(self.names)

        # A_q|A_k|A_v (or A_gate|A_up) stacked, replicated over TP: each rank applies it to the
        # tokens it holds (its sequence shard under SP), so only r-wide codes cross ranks.
        self.linear_a = ReplicatedWeight(input_size, n * rank, config)
        # Per-position std on A's rows (each position p owns rows [p r, (p+1) r) of the stack).
        stds = torch.tensor([_lowrank_std(config, input_size, s, rank) for s in sizes])
        if config.perform_initialization:
            with torch.no_grad():
                _normal(1.0)(self.linear_a.weight)
                self.linear_a.weight.mul_(
                    stds.repeat_interleave(rank).to(self.linear_a.weight)[:, None])
        self.tp, self.sequence_parallel = t, config.sequence_parallel and t > 1

        self.linear_b = _Factors(config)
        for name, size in zip(self.names, sizes):
            b = ColumnParallelLinear(
                rank, size, config=config, gather_output=False, bias=False, skip_bias_add=True,
                init_method=_normal(_lowrank_std(config, input_size, size, rank)),
                tp_group=tp_group)
            # Z is already full-sequence: no SP gather, and dZ is summed over TP once for all
            # positions in gather_codes' backward, not per position here.
            b.sequence_parallel = False
            b.allreduce_dgrad = False
            b.disable_grad_reduce = True
            self.linear_b.add_module(name, b)

        self.beta = _make_beta(n, config)
        if self.beta is not None and t > 1:  # a partial gradient, summed over TP once a step
            self.beta.partial_over_tp = True
            self.beta.sequence_parallel = self.sequence_parallel
        self.output_width = output_size // t  # this rank's share of the fused output

    @staticmethod
    def _positions(config: CRNetConfig, layout: str, output_size: int):
        """Names and full output widths of the layout's positions (``positions`` table)."""
        width = config.position_widths()
        members = positions.in_layout(layout)
        names, sizes = [p.name for p in members], [width[p.width_out] for p in members]
        if sum(sizes) != output_size:
            raise ValueError(f"{layout} position sizes {sizes} do not sum to {output_size}")
        return names, sizes

    def _assemble(self, ys: Sequence[torch.Tensor]) -> torch.Tensor:
        if self.layout == "glu":
            return torch.cat(ys, dim=-1)
        q, k, v = ys
        hn = self.config.kv_channels
        groups = k.shape[-1] // hn
        lead = q.shape[:-1]
        q = q.reshape(*lead, groups, -1)
        k = k.reshape(*lead, groups, hn)
        v = v.reshape(*lead, groups, hn)
        return torch.cat([q, k, v], dim=-1).reshape(*lead, -1)

    def position_scales(self) -> torch.Tensor:
        """s(beta) per position (beta's gradient here is this rank's part; summed per step)."""
        return signed_scale(self.beta, self.eps)

    def slices(self, y: torch.Tensor) -> List[torch.Tensor]:
        """Per-position views of a local output in the fused layout (no copies)."""
        if self.layout == "glu":
            return list(y.chunk(2, dim=-1))
        c = self.config
        split = positions.qkv_group_split(c.num_attention_heads, c.num_query_groups,
                                          c.kv_channels)
        grouped = y.view(*y.shape[:-1], -1, sum(split))
        return list(grouped.split(split, dim=-1))

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Z = X A on this rank's tokens (its sequence shard under SP, all tokens otherwise)."""
        return F.linear(x, self.linear_a.weight)

    def gather_codes(self, z_local: torch.Tensor) -> torch.Tensor:
        """Z of every token. Each rank's B shards give a partial dZ: under SP the sequence
        all-gather's backward reduce-scatters it (r wide); otherwise it is all-reduced (r wide)
        and dX = dZ A^T is then complete on every rank, with no h-wide collective."""
        if self.tp == 1:
            return z_local
        if self.sequence_parallel:
            return gather_from_sequence_parallel_region(z_local, tensor_parallel_output_grad=True,
                                                        group=self.tp_group)
        return copy_to_tensor_model_parallel_region(z_local, group=self.tp_group)

    def _codes_grad(self, grad: torch.Tensor) -> torch.Tensor:
        """What ``gather_codes``' backward does to dZ (for replay)."""
        if self.tp == 1:
            return grad
        if self.sequence_parallel:
            return _reduce_scatter_along_first_dim(grad.contiguous(), self.tp_group)
        return _reduce(grad.contiguous(), self.tp_group)

    def expand(self, z: torch.Tensor) -> torch.Tensor:
        """Z B (local output shard, fused layout) from the full codes Z."""
        zs = z.split(self.rank, dim=-1)
        # Z is complete and dZ is reduced by gather_codes: each B_p is a plain local matmul
        # (autograd's, which takes the strided gradient slices of the fused layout as they are)
        return self._assemble([F.linear(zp, b.weight) for b, zp in zip(self.linear_b.values(), zs)])

    def forward(self, x: torch.Tensor, chain_prev: torch.Tensor):
        zb = self.expand(self.gather_codes(self.codes(x)))
        if self.beta is None:  # the lowrank baseline: no cross-layer term
            return zb, None
        return chain_add(zb, chain_prev, self.position_scales(), self.slices), None

    def forward_with_codes(self, x, chain_prev, keep_zb: bool = False):
        """(Y, this rank's codes Z, Z B or None) for recompute."""
        z_local = self.codes(x)
        zb = self.expand(self.gather_codes(z_local))
        y = chain_add(zb.clone() if keep_zb else zb, chain_prev, self.position_scales(),
                      self.slices)
        return y, z_local, zb if keep_zb else None

    def factors(self, z_full: torch.Tensor):
        """(Z_p, B_p) per position (recompute's inversion)."""
        return [(zp, b.weight) for b, zp in zip(self.linear_b.values(),
                                                 z_full.split(self.rank, dim=-1))]

    def replay(self, x, chain_prev, z_full, y):
        """Rebuild the graph of ``forward`` from saved codes and the known output Y, without
        matmuls or the chain arithmetic (only the backward needs the graph)."""
        z = replay_linear(x, self.linear_a.weight, z_full, self._codes_grad)
        pieces = [replay_linear(zp, b.weight, _placeholder(zp, b.weight.shape[0]))
                  for b, zp in zip(self.linear_b.values(), z.split(self.rank, dim=-1))]
        return replay_chain(y.to(x.dtype), chain_prev, self.position_scales(), self.slices,
                            pieces)


class CRNetRowParallelLinear(MegatronModule):
    """CR-Net ``linear_proj`` / ``linear_fc2``: A row-sharded, reduce over r, B replicated."""

    def __init__(self, input_size: int, output_size: int, *, config: CRNetConfig, rank: int,
                 bias: bool = False, input_is_parallel: bool = True, tp_group=None, **unused):
        super().__init__(config=config)
        if bias or not input_is_parallel:
            raise ValueError("CR-Net row projections take a TP-sharded input and have no bias")
        self.rank, self.eps = rank, config.crnet_eps
        self.tp_group = _tp_group(tp_group)
        std = _lowrank_std(config, input_size, output_size, rank)
        self.linear_a = RowParallelLinear(
            input_size, rank, config=config, init_method=_normal(std), bias=False,
            input_is_parallel=True, skip_bias_add=True, tp_group=self.tp_group)
        self.linear_b = torch.nn.Linear(rank, output_size, bias=False, device=_device(config),
                                        dtype=config.params_dtype)
        if config.perform_initialization:
            with torch.no_grad():
                _normal(std)(self.linear_b.weight)
        self.beta = _make_beta(1, config)
        # Under SP each rank holds a sequence shard, so B and beta see partial gradients: marked
        # like Megatron's norms, they are summed over TP once per step (finalize_model_grads,
        # in fp32), not all-reduced in autograd on every micro-batch.
        for param in (self.linear_b.weight, self.beta):
            if param is not None and self.linear_a.sequence_parallel:
                param.sequence_parallel = param.partial_over_tp = True

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Z = X A, reduced over TP (all-reduce, or reduce-scatter along the sequence under SP)."""
        return self.linear_a(x)[0]

    def gather_codes(self, z: torch.Tensor) -> torch.Tensor:
        return z

    def expand(self, z: torch.Tensor) -> torch.Tensor:
        return F.linear(z, self.linear_b.weight)

    def forward(self, x: torch.Tensor, chain_prev: torch.Tensor):
        zb = F.linear(self.codes(x), self.linear_b.weight)
        if self.beta is None:  # the lowrank baseline: no cross-layer term
            return zb, None
        return chain_add(zb, chain_prev, signed_scale(self.beta, self.eps), whole), None

    def forward_with_codes(self, x, chain_prev, keep_zb: bool = False):
        """(Y, codes Z, Z B or None) for recompute."""
        z = self.codes(x)
        zb = F.linear(z, self.linear_b.weight)
        y = chain_add(zb.clone() if keep_zb else zb, chain_prev, signed_scale(self.beta, self.eps),
                      whole)
        return y, z, zb if keep_zb else None

    def replay(self, x, chain_prev, z_full, y):
        """Rebuild the graph of ``forward`` from saved codes and the known output Y."""
        grad_transform = functools.partial(gather_seq_grad, group=self.tp_group) \
            if self.linear_a.sequence_parallel else None
        z = replay_linear(x, self.linear_a.weight, z_full, grad_transform)
        b = self.linear_b.weight
        piece = replay_linear(z, b, _placeholder(z, b.shape[0]))
        return replay_chain(y.to(x.dtype), chain_prev, signed_scale(self.beta, self.eps), whole,
                            [piece])

    def position_scales(self) -> torch.Tensor:
        return signed_scale(self.beta, self.eps)

    def factors(self, z_full: torch.Tensor):
        return [(z_full, self.linear_b.weight)]

    @staticmethod
    def slices(y: torch.Tensor) -> List[torch.Tensor]:
        return whole(y)


def _placeholder(z: torch.Tensor, width: int) -> torch.Tensor:
    """A Z B-shaped stand-in that allocates nothing: replayed B outputs are never read."""
    return z.new_zeros(()).expand(*z.shape[:-1], width)


def is_crnet_linear(module) -> bool:
    return isinstance(module, (CRNetColumnParallelLinear, CRNetRowParallelLinear))


def project(linear, x: torch.Tensor, chain_prev):
    """Run a dense or CR-Net projection; its output is also the chain handed to the next layer.

    Inside ``projection.projection_scheme(s)`` (recompute) ``s.project`` runs it instead."""
    scheme = active_scheme()
    if scheme is not None:
        return scheme.project(linear, x, chain_prev)
    if is_crnet_linear(linear):
        y, _ = linear(x, chain_prev)
    else:
        y, _ = linear(x)
    return y

