"""Counting tensor-parallel communication (a test and benchmark helper).

``CommCounter(group)`` wraps the collectives Megatron-Core and this package call
(``all_reduce``, ``all_gather_into_tensor``, ``reduce_scatter_tensor``, and the names
megatron-core bound at import) while it is entered, and records every call on ``group``:
its kind and the elements of the full (unsharded) tensor. ``wire_bytes`` gives what one rank
sends under the ring algorithm: ``2 (t-1)/t N`` for an all-reduce, ``(t-1)/t N`` for an
all-gather or a reduce-scatter of N bytes, so "half the traffic" compares like with like.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from typing import Dict, List, Tuple

import torch
import torch.distributed as dist

_WRAPPED = ("all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor", "_all_gather_base",
            "_reduce_scatter_base")


class CommCounter(contextlib.AbstractContextManager):
    def __init__(self, group):
        self.group = group
        self.calls: List[Tuple[str, int, int]] = []  # (kind, full elements, bytes per element)
        self._saved = []

    def _record(self, kind: str, tensor: torch.Tensor, group) -> None:
        if group is self.group:
            self.calls.append((kind, tensor.numel(), tensor.element_size()))

    def _wrap(self, name: str, fn):
        def all_reduce(tensor, *a, group=None, **k):
            self._record("all_reduce", tensor, group)
            return fn(tensor, *a, group=group, **k)

        def all_gather(output, input_, *a, group=None, **k):
            self._record("all_gather", output, group)
            return fn(output, input_, *a, group=group, **k)

        def reduce_scatter(output, input_, *a, group=None, **k):
            self._record("reduce_scatter", input_, group)
            return fn(output, input_, *a, group=group, **k)

        return {"all_reduce": all_reduce}.get(name) or (
            all_gather if "gather" in name else reduce_scatter)

    def __enter__(self):
        from megatron.core.tensor_parallel import layers, mappings

        for name in _WRAPPED:
            if hasattr(dist, name):
                self._patch(dist, name, self._wrap(name, getattr(dist, name)))
        for module in (mappings, layers):  # names megatron-core bound at import
            for name, kind in (("dist_all_gather_func", "all_gather_into_tensor"),
                               ("dist_reduce_scatter_func", "reduce_scatter_tensor")):
                if hasattr(module, name):
                    self._patch(module, name, self._wrap(kind, getattr(module, name)))
        return self

    def _patch(self, owner, name, value):
        self._saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    def __exit__(self, *exc):
        for owner, name, value in reversed(self._saved):
            setattr(owner, name, value)
        self._saved.clear()
        return False

    def elements(self) -> Dict[str, int]:
        """Full-tensor elements per kind."""
        out: Counter = Counter()
        for kind, n, _ in self.calls:
            out[kind] += n
        return dict(out)

    def call_counts(self) -> Dict[str, int]:
        """Calls per kind."""
        return dict(Counter(kind for kind, _, _ in self.calls))

    def smallest(self) -> int:
        """Elements of the smallest call (0 when none): a scalar collective shows here."""
        return min((n for _, n, _ in self.calls), default=0)

    def wire_bytes(self) -> float:
        """Bytes one rank sends (ring algorithm, ``counting.comm_wire_bytes``)."""
        from crnet_megatron.analysis.counting import comm_wire_bytes

        return sum(comm_wire_bytes({kind: n}, self.group.size(), b) for kind, n, b in self.calls)
