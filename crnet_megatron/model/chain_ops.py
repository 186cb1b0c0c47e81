"""The chain update ``Y = Z B + s_p * Y_prev`` on each projection position p, fused.

``chain_add(zb, prev, s, slices)`` writes the scaled chain into ``zb`` (the fresh output of the
B matmuls, which nothing else keeps for backward), so the forward makes no temporary, and scales
by one scalar per position instead of gathering a per-channel vector. Its backward hands
``dY`` through to ``Z B`` unchanged, writes ``s_p dY_p`` into one buffer for ``dY_prev`` and
reduces ``<dY_p, Y_prev,p>`` once per position (products and sum in fp32 at least) for ``ds``.
``slices(t)`` returns the per-position views of a tensor in the fused layout.
"""

from __future__ import annotations

from typing import Callable, List

import torch

Slices = Callable[[torch.Tensor], List[torch.Tensor]]


class _ChainAdd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, zb, prev, s, slices: Slices):
        for k, (z, p) in enumerate(zip(slices(zb), slices(prev))):
            z.addcmul_(p, s[k])
        ctx.mark_dirty(zb)
        ctx.save_for_backward(prev, s)
        ctx.slices = slices
        return zb

    @staticmethod
    def backward(ctx, grad):
        prev, s = ctx.saved_tensors
        grad = grad.contiguous()
        grad_prev = torch.empty_like(prev) if ctx.needs_input_grad[1] else None
        outs = ctx.slices(grad_prev) if grad_prev is not None else [None] * s.numel()
        for k, (g, o) in enumerate(zip(ctx.slices(grad), outs)):
            if o is not None:
                torch.mul(g, s[k], out=o)
        grad_s = position_dots(grad, prev, ctx.slices)
        return grad, grad_prev, grad_s.to(s.dtype), None


def position_dots(grad: torch.Tensor, prev: torch.Tensor, slices: Slices) -> torch.Tensor:
    """``<dY_p, Y_prev,p>`` per position: products and sum in fp32 at least (bf16 products
    would round each term before the sum)."""
    acc = torch.promote_types(grad.dtype, torch.float32)
    return torch.stack([torch.dot(g.reshape(-1).to(acc), p.reshape(-1).to(acc))
                        for g, p in zip(slices(grad), slices(prev))])


def chain_add(zb: torch.Tensor, prev: torch.Tensor, s: torch.Tensor, slices: Slices) -> torch.Tensor:
    """``zb + s_p * prev`` per position slice, computed in place in ``zb``."""
    return _ChainAdd.apply(zb, prev, s, slices)


def whole(t: torch.Tensor) -> List[torch.Tensor]:
    """One position: the whole tensor (row projections)."""
    return [t]


class _ReplayChain(torch.autograd.Function):
    """Recompute's chain update: the output Y is already known (stored or recovered), so the
    forward only returns it; the backward is ``_ChainAdd``'s, and each B piece gets its slice
    of dY. Replaces assembling the pieces and adding the scaled chain again."""

    @staticmethod
    def forward(ctx, y, prev, s, slices: Slices, *pieces):
        ctx.save_for_backward(prev, s)
        ctx.slices, ctx.shapes = slices, [p.shape for p in pieces]
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        grad_zb, grad_prev, grad_s, _ = _ChainAdd.backward(ctx, grad)
        parts = ctx.slices(grad_zb.contiguous())
        return (None, grad_prev, grad_s, None,
                *(g.reshape(shape) for g, shape in zip(parts, ctx.shapes)))


def replay_chain(y: torch.Tensor, prev: torch.Tensor, s: torch.Tensor, slices: Slices,
                 pieces: List[torch.Tensor]) -> torch.Tensor:
    """``Y`` (known) as the output of ``chain_add(assemble(pieces), prev, s)`` for autograd."""
    # y is a saved value (possibly an output of the recompute function itself): no gradient
    return _ReplayChain.apply(y.detach(), prev, s, slices, *pieces)


def invert_chain(y: torch.Tensor, factors, s: torch.Tensor, slices: Slices) -> torch.Tensor:
    """Y_prev = (Y - Z_p B_p) / s_p per position, in fp32 at least, into one buffer (no
    gradient).

    ``factors`` are the (Z_p, B_p) pairs in position order; each Z_p B_p is computed and
    subtracted straight into its slice, so the fused Z B is never assembled."""
    acc = torch.promote_types(y.dtype, torch.float32)
    prev = torch.empty(y.shape, dtype=acc, device=y.device)
    for k, ((z, b), y_k, p_k) in enumerate(zip(factors, slices(y), slices(prev))):
        zb = torch.nn.functional.linear(z, b)
        torch.sub(y_k.to(acc), zb.view(y_k.shape).to(acc), out=p_k)
        p_k.div_(s[k].to(acc))
    return prev
