"""Measuring what autograd keeps for backward (device-agnostic, works on CPU)."""

from __future__ import annotations

from typing import Any, Callable, Tuple

import torch


def saved_activation_bytes(fn: Callable[[], Any]) -> Tuple[int, Any]:
    """Run ``fn`` and count the bytes of every tensor autograd saves for backward, once per
    storage view (``torch.autograd.graph.saved_tensors_hooks``); returns (bytes, fn's result)."""
    seen, total = set(), [0]

    def pack(t):
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key not in seen:
            seen.add(key)
            total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return total[0], out
