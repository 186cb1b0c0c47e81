"""Autograd ops for CR-Net recomputation: a linear layer whose forward output is already known.

``ReplayLinear(x, W, out, grad_transform)`` returns ``out`` (a saved or recovered value) without
computing ``x @ W^T``, and backpropagates exactly as that linear layer would:
``g = grad_transform(dout)``, ``dx = g W``, ``dW = g^T x``. ``grad_transform`` stands in for the
backward of the TP collective that followed the matmul in the original forward
(split of an all-gather, all-gather of a reduce-scatter, identity of an all-reduce).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from megatron.core.tensor_parallel.mappings import _gather_along_first_dim


class ReplayLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, out, grad_transform: Optional[Callable]):
        ctx.save_for_backward(x, weight)
        ctx.grad_transform = grad_transform
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        if ctx.grad_transform is not None:
            grad = ctx.grad_transform(grad)
        grad = grad.to(weight.dtype)
        dx = grad @ weight
        dw = grad.reshape(-1, grad.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
        return dx, dw, None, None


def gather_seq_grad(grad: torch.Tensor, group) -> torch.Tensor:
    """Backward of a reduce-scatter along the sequence over ``group`` (a row A under sequence
    parallel, its layer's TP group)."""
    return _gather_along_first_dim(grad, group)


def replay_linear(x, weight, out, grad_transform=None):
    return ReplayLinear.apply(x, weight, out, grad_transform)
