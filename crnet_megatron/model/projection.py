"""The CR-Net projection interface, stated once, and how a recompute scheme hooks into it.

Both ``linears.CRNetColumnParallelLinear`` and ``linears.CRNetRowParallelLinear`` implement
``CRNetProjection``. A recompute scheme (``recompute.py``) changes how every projection of a
layer runs without the model knowing: it enters ``projection_scheme(scheme)`` around the
layer's ordinary forward, and ``project`` (which the attention and MLP modules call for each
projection) hands the projection to ``scheme.project(linear, x, chain_prev)`` while it is
active, as torchtitan applies activation checkpointing to unchanged modules.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import List, Optional, Protocol, Tuple, runtime_checkable

import torch


@runtime_checkable
class CRNetProjection(Protocol):
    """``Y = s(beta_p) * Y_prev + (X A_p) B_p`` for the positions p of one fused projection."""

    rank: int

    def forward(self, x: torch.Tensor, chain_prev: torch.Tensor) -> Tuple[torch.Tensor, None]:
        """Y in the projection's TP layout (Megatron's ``(output, bias)`` convention)."""

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Z = X A on the tokens this rank holds: what recompute stores."""

    def gather_codes(self, z_local: torch.Tensor) -> torch.Tensor:
        """Z of every token this rank's B factors need (a TP collective, or nothing)."""

    def expand(self, z: torch.Tensor) -> torch.Tensor:
        """Z B in the output layout (no chain term)."""

    def factors(self, z: torch.Tensor) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """(Z_p, B_p) per position, for inverting the chain."""

    def position_scales(self) -> torch.Tensor:
        """s(beta_p) per position (gradient summed over TP where a rank sees a part)."""

    def slices(self, y: torch.Tensor) -> List[torch.Tensor]:
        """Per-position views of a tensor in the output layout (no copies)."""

    def forward_with_codes(self, x, chain_prev, keep_zb: bool = False):
        """(Y, local codes Z, Z B or None): the forward, handing recompute what it stores."""

    def replay(self, x, chain_prev, z_full, y) -> torch.Tensor:
        """Y (known) with the forward's autograd graph, from stored codes: no matmuls."""


_SCHEME: contextvars.ContextVar = contextvars.ContextVar("crnet_projection_scheme",
                                                         default=None)


@contextlib.contextmanager
def projection_scheme(scheme):
    """Run every projection through ``scheme.project`` inside the ``with`` block."""
    token = _SCHEME.set(scheme)
    try:
        yield scheme
    finally:
        _SCHEME.reset(token)


def active_scheme() -> Optional[object]:
    return _SCHEME.get()
