"""Micro-batches: a resumable per-DP-rank sample iterator over any dataset, and Megatron's rule
for which ranks read them (TP rank 0 of the first and last pipeline stage, broadcast over TP).
Training, training-time eval and ``crnet-eval`` read through these."""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from crnet_megatron.data.validate import check_batch_tokens


class SampleIterator:
    """Micro-batches of this DP rank, resumable from a global ``consumed`` sample count.

    Global sample i of a step goes to DP rank (i // micro_batch) % dp; the dataset's own
    shuffle (GPTDataset) makes sequential indices a random order.
    """

    KEYS = ("tokens", "labels", "loss_mask", "position_ids")

    def __init__(self, dataset, micro_batch_size: int, dp_rank: int, dp_size: int,
                 consumed: int = 0, device=None, vocab_size: Optional[int] = None,
                 prefixes: Sequence[str] = ()):
        if dataset is None or len(dataset) == 0:
            raise ValueError("empty dataset split; check data.split and the data size")
        self.ds, self.mbs, self.dp_rank, self.dp = dataset, micro_batch_size, dp_rank, dp_size
        self.consumed, self.device = consumed, device
        self.vocab_size, self.prefixes = vocab_size, prefixes

    def __iter__(self):
        return self

    def __next__(self) -> Dict[str, torch.Tensor]:
        start = self.consumed + self.dp_rank * self.mbs
        samples = [self.ds[(start + i) % len(self.ds)] for i in range(self.mbs)]
        self.consumed += self.mbs * self.dp
        batch = {k: torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in self.KEYS}
        if self.vocab_size is not None:
            check_batch_tokens(torch.cat([batch["tokens"], batch["labels"]]), self.vocab_size,
                               self.prefixes)
        return {k: v.to(self.device) for k, v in batch.items()}


def reads_data() -> bool:
    """Whether this rank reads micro-batches: TP rank 0 of the first and the last pipeline
    stage (Megatron's rule); the middle stages need none, the other TP ranks get a broadcast."""
    ends = (ps.is_pipeline_first_stage(ignore_virtual=True)
            or ps.is_pipeline_last_stage(ignore_virtual=True))
    return ends and ps.get_tensor_model_parallel_rank() == 0


_INT_KEYS = ("tokens", "labels", "position_ids")


def get_batch(data_iterator, micro_batch_size: int, seq_len: int,
              device) -> Optional[Dict[str, torch.Tensor]]:
    """This stage's micro-batch (None on a middle stage): read on TP rank 0 and broadcast over
    TP in two calls (Megatron's ``get_batch_on_this_tp_rank``)."""
    if not (ps.is_pipeline_first_stage(ignore_virtual=True)
            or ps.is_pipeline_last_stage(ignore_virtual=True)):
        return None
    if ps.get_tensor_model_parallel_world_size() == 1:
        return next(data_iterator)
    shape = (micro_batch_size, seq_len)
    if ps.get_tensor_model_parallel_rank() == 0:
        batch = next(data_iterator)
        ints = torch.stack([batch[k].to(torch.int64) for k in _INT_KEYS])
        mask = batch["loss_mask"].float().contiguous()
    else:
        ints = torch.empty((len(_INT_KEYS), *shape), dtype=torch.int64, device=device)
        mask = torch.empty(shape, dtype=torch.float32, device=device)
    src, group = ps.get_tensor_model_parallel_src_rank(), ps.get_tensor_model_parallel_group()
    dist.broadcast(ints, src, group=group)
    dist.broadcast(mask, src, group=group)
    return dict(zip(_INT_KEYS, ints), loss_mask=mask)
