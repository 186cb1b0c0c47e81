"""Which chains Algorithm 1 stores instead of inverting, decided without stalling the forward.

Inverting layer l's chain divides by its ``s(beta)`` and subtracts ``Z B``: unsafe when
``|s(beta)|`` is below ``crnet_recompute_min_scale`` or, for 16-bit chains, when ``||Z B||`` is
more than ``crnet_recompute_max_ratio`` times the carried term. Both statistics live on the
device. The decision for a stage's forward (one micro-batch) is taken from the newest earlier
forward's statistics that have reached the host (a non-blocking copy started at the end of each
forward, adopted once its event says it landed), so neither a layer nor a micro-batch waits for
the device. The first forward of a stage has no statistics yet and reads them as they come,
once.
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
    """The host's view of one stage's flags, kept on its first layer between forwards.

    No forward waits for the device: the flags a forward records reach the host through a
    non-blocking copy, and a later forward adopts them once that copy has landed (its event
    ``query()``s true); until then it decides with the last flags it adopted. The small-scale
    flags change only when the optimizer steps the betas, so they are at most a few forwards
    old; the ill-conditioning flags are a previous micro-batch's measure either way."""

    def __init__(self):
        self.small: Optional[List[List[bool]]] = None
        self.ill: Optional[List[List[bool]]] = None
        self._host: Optional[torch.Tensor] = None  # [2, layers, 4]: the last flags recorded
        self._copied = None  # CUDA event of their copy to the host; None: already on the host
        self._fresh = False  # _host holds flags not adopted yet
        self._pinned: Optional[torch.Tensor] = None  # the pinned buffer, allocated once

    @staticmethod
    def of(layers) -> "StageGuard":
        first = layers[0]
        if not hasattr(first, "_crnet_stage_guard"):
            object.__setattr__(first, "_crnet_stage_guard", StageGuard())
        return first._crnet_stage_guard

    def decisions(self, small_now: torch.Tensor):
        """(small [i][c], ill [i][c] or None) for this forward: the newest recorded flags whose
        copy has landed, else the last adopted; on the stage's first forward the current
        small-scale flags (read now, once) and no ill-conditioning flags yet."""
        if self._fresh and (self._copied is None or self._copied.query()):
            flags = self._host.tolist()  # host memory: the copy has landed
            self._fresh = False
            self.small, self.ill = flags[0], flags[1]
        if self.small is None:
            self.small = small_now.tolist()  # the stage's first forward: one read, once
        return self.small, self.ill

    def record(self, small_now: torch.Tensor, ratios: List, max_ratio: Optional[float]) -> None:
        """Start the copy of this forward's flags to the host, for a later forward."""
        ill = torch.zeros_like(small_now)
        for i, row in ratios:
            ill[i] = row > max_ratio
        self._host, self._copied = self._start_copy(torch.stack([small_now, ill]))
        self._fresh = True

    def _start_copy(self, flags: torch.Tensor):
        """(host tensor, event or None): a non-blocking copy into pinned memory on CUDA."""
        if not flags.is_cuda:
            return flags, None
        if self._pinned is None or self._pinned.shape != flags.shape:
            self._pinned = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
        self._pinned.copy_(flags, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return self._pinned, event
