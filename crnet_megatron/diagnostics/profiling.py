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


def saved_activation_storage_bytes(fn: Callable[[], Any], exclude=()) -> Tuple[int, Any]:
    """Like ``saved_activation_bytes``, but counting memory: each storage autograd keeps is
    counted once, whole, however many views of it are saved, at its size when ``fn`` returns
    (a storage released after use and recomputed in backward, as Megatron's
    ``CheckpointWithoutOutput`` does, counts 0); storages of ``exclude`` (the model's
    parameters) are not activations and are skipped."""
    skip = {p.untyped_storage().data_ptr() for p in exclude}
    kept = {}

    def pack(t):
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in kept and key not in skip:
            kept[key] = storage
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(s.nbytes() for s in kept.values()), out


HOST_SYNCS = (torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__,
              torch.Tensor.__float__, torch.Tensor.__int__, torch.Tensor.cpu)


class HostSyncCounter(torch.overrides.TorchFunctionMode):
    """Counts, while entered, the tensor calls that make the host wait for the device
    (``HOST_SYNCS``): the test of no per-layer sync and ``crnet-bench costs`` use it."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in HOST_SYNCS:
            self.calls += 1
        return func(*args, **(kwargs or {}))


def count_dataset_reads() -> list:
    """From now on in this process, every sample megatron-core's ``GPTDataset`` yields is
    counted in the returned one-element list (reset it by assigning ``[0] = 0``)."""
    from megatron.core.datasets.gpt_dataset import GPTDataset

    reads = [0]
    getitem = GPTDataset.__getitem__

    def counted(self, idx):
        reads[0] += 1
        return getitem(self, idx)

    GPTDataset.__getitem__ = counted
    return reads
