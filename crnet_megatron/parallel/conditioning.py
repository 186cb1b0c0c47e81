"""Which chains Algorithm 1 stores instead of inverting, decided without stalling the forward.

Inverting layer l's chain divides by its ``s(beta)`` and subtracts ``Z B``: unsafe when
``|s(beta)|`` is below ``crnet_recompute_min_scale`` or, for 16-bit chains, when ``||Z B||`` is
more than ``crnet_recompute_max_ratio`` times the carried term. Both statistics live on the
device. The decision for a stage's forward (one micro-batch) is taken from its previous
forward's statistics, which reach the host through a non-blocking copy started at the end of
that forward, so no layer waits for the device (one read of host memory per stage and
micro-batch, none per layer). The first forward of a stage has no statistics yet and reads them
as they come, once.
"""

from __future__ import annotations

import logging
from typing import List, Optional

import torch

from crnet_megatron.model.layer import Chains

logger = logging.getLogger("crnet_megatron.parallel.recompute")
_WARNED = set()  # (layer, chain, reason kind) already logged: each fallback is reported once


def log_fallback(layer_number: int, chain: int, reason: str) -> None:
    key = (layer_number, chain, reason.split()[0])
    if key not in _WARNED:
        _WARNED.add(key)
        logger.warning("CR-Net recompute: storing layer %d's %s chain instead of inverting it "
                       "(%s)", layer_number, Chains._fields[chain], reason)


def small_scales(layers, chain_modules, is_crnet_layer, threshold: float) -> torch.Tensor:
    """[layers, 4] on the device: recovering layer i's chain c would divide by a |s(beta)| of
    layer i+1 below ``threshold``."""
    device = next(layers[0].parameters()).device
    rows = []
    for i in range(len(layers)):
        nxt = layers[i + 1] if i + 1 < len(layers) else None
        if nxt is None or not is_crnet_layer(nxt):
            rows.append(torch.full((4,), float("inf"), device=device))
            continue
        rows.append(torch.stack([m.beta.detach().abs().min().float() + m.eps
                                 for m in chain_modules(nxt)]))
    return torch.stack(rows) < threshold


class StageGuard:
    """The host's view of one stage's flags, kept on its first layer between forwards."""

    def __init__(self):
        self.small: Optional[List[List[bool]]] = None
        self.ill: Optional[List[List[bool]]] = None
        self._pending: Optional[torch.Tensor] = None  # [2, layers, 4] on its way to the host
        self._host: Optional[torch.Tensor] = None     # its pinned buffer, allocated once
        self._copied = None                           # CUDA event: the copy has landed

    @staticmethod
    def of(layers) -> "StageGuard":
        first = layers[0]
        if not hasattr(first, "_crnet_stage_guard"):
            object.__setattr__(first, "_crnet_stage_guard", StageGuard())
        return first._crnet_stage_guard

    def decisions(self, small_now: torch.Tensor):
        """(small [i][c], ill [i][c] or None) for this forward: the previous forward's flags, or
        on the first the current small-scale flags (read now) and no ill-conditioning flags."""
        if self._pending is not None:
            if self._copied is not None:  # recorded a forward ago: usually complete
                self._copied.synchronize()
            flags = self._pending.tolist()  # host memory, copied during the previous forward
            self._pending = None
            self.small, self.ill = flags[0], flags[1]
        if self.small is None:
            self.small = small_now.tolist()  # the stage's first forward: one read, once
        return self.small, self.ill

    def record(self, small_now: torch.Tensor, ratios: List, max_ratio: Optional[float]) -> None:
        """Start the copy of this forward's flags to the host, for the next forward."""
        ill = torch.zeros_like(small_now)
        for i, row in ratios:
            ill[i] = row > max_ratio
        flags = torch.stack([small_now, ill])
        if not flags.is_cuda:
            self._pending = flags
            return
        if self._host is None or self._host.shape != flags.shape:
            self._host = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
        self._pending = self._host.copy_(flags, non_blocking=True)
        self._copied = torch.cuda.Event()
        self._copied.record()
