"""Pipeline parallelism that carries the CR-Net chains between stages and model chunks.

Megatron-Core's schedules move one tensor per micro-batch between stages, sized
``(s', b, hidden)`` (``s' = s/t`` under sequence parallel), and backpropagate only the first
output tensor. So a stage packs the residual stream and its last layer's four chains into ONE
tensor ``(s', b, payload_width)``; the next stage unpacks it, and autograd carries the chain
gradients back through the same packed tensor. The o/down chains share the residual stream's
layout; the qkv/fc1 chains are full-sequence and hidden-sharded, so under SP their ``s = t s'``
rows are folded into the width (``[t, s', b, w] -> [s', b, t w]``).

Only the last dimension of Megatron's P2P shape changes, and it changes in the one object both
schedules are given for their P2P traffic: ``PayloadP2PCommunicator``, Megatron's
``P2PCommunicator`` with every receive buffer sized to the payload. So users keep Megatron's
1F1B and interleaved (virtual pipeline) schedules unmodified, with their micro-batching; no
shape exchange precedes a transfer (the payload's shape is known on both sides). Under
interleaving each model chunk is a stage of the global layer order: its first chunk on a rank
receives the chains of the previous rank's chunk (or, on the first rank, of the last rank's
previous chunk), exactly as at a 1F1B stage boundary.
"""

from __future__ import annotations

import functools
from typing import List, Tuple

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator
from megatron.core.process_groups_config import ProcessGroupCollection

from crnet_megatron.model import positions
from crnet_megatron.model.layer import Chains
from crnet_megatron.parallel import compat


def _fold(x: torch.Tensor, fold: int) -> torch.Tensor:
    if fold == 1:
        return x
    s, b, w = x.shape
    return x.view(fold, s // fold, b, w).permute(1, 2, 0, 3).reshape(s // fold, b, fold * w)


def _unfold(x: torch.Tensor, fold: int) -> torch.Tensor:
    if fold == 1:
        return x
    s1, b, fw = x.shape
    return x.view(s1, b, fold, fw // fold).permute(2, 0, 1, 3).reshape(fold * s1, b, fw // fold)


def pack_stage_output(hidden: torch.Tensor, chains: Chains, config) -> torch.Tensor:
    """Residual stream + the four chains -> one ``(s', b, payload_width)`` tensor, in the
    order of ``positions.PAYLOAD_PARTS``."""
    if not config.carries_chains:
        return hidden
    tensors = {"hidden": hidden, "proj": chains.proj, "fc2": chains.fc2, "qkv": chains.qkv,
               "fc1": chains.fc1}
    return torch.cat([_fold(tensors[name], fold) for name, _, fold in config.payload_parts()],
                     dim=-1)


def unpack_stage_input(packed: torch.Tensor, config) -> Tuple[torch.Tensor, Chains]:
    """Inverse of ``pack_stage_output``."""
    parts = config.payload_parts()
    expected = positions.packed_width(parts)
    if packed.shape[-1] != expected:
        raise ValueError(f"stage input has width {packed.shape[-1]}, expected {expected} "
                         "(residual + chains); are all stages built with the same config?")
    if not config.carries_chains:
        return packed, None
    pieces = packed.split([width * fold for _, width, fold in parts], dim=-1)
    out = {name: _unfold(x, fold) for (name, _, fold), x in zip(parts, pieces)}
    return out.pop("hidden"), Chains(**out)


class StagePayload:
    """How a stage of ``config``'s model packs its outputs and unpacks its inputs (attached to
    the decoder block by ``parallel.build.parallelize``)."""

    def __init__(self, config):
        self.config = config

    def pack(self, hidden: torch.Tensor, chains: Chains) -> torch.Tensor:
        return pack_stage_output(hidden, chains, self.config)

    def unpack(self, packed: torch.Tensor) -> Tuple[torch.Tensor, Chains]:
        return unpack_stage_input(packed, self.config)


# what ``PayloadP2PCommunicator`` relies on in megatron-core's private ``_communicate``: every
# transfer of the schedules goes through it, and its buffers are sized by ``tensor_shape``
P2P_API = ("tensor_send_next", "tensor_send_prev", "recv_prev", "recv_next", "tensor_shape")


def check_p2p_api(communicate=None) -> None:
    """Refuse to start if megatron-core's ``P2PCommunicator._communicate`` (a private method the
    payload communicator overrides) no longer takes the keyword arguments above."""
    import inspect

    import megatron.core

    params = inspect.signature(communicate or P2PCommunicator._communicate).parameters
    missing = [name for name in P2P_API if name not in params
               or params[name].kind is not inspect.Parameter.KEYWORD_ONLY]
    if missing:
        raise RuntimeError(
            f"megatron-core {megatron.core.__version__}: P2PCommunicator._communicate no longer "
            f"takes the keyword arguments {missing}, which the CR-Net pipeline payload "
            "overrides (parallel/pipeline.py); use megatron-core 0.16.x")


@functools.lru_cache(maxsize=None)
def _check_p2p_api_once() -> None:
    """``check_p2p_api`` once per process (a communicator is built for every schedule call)."""
    check_p2p_api()


class PayloadP2PCommunicator(P2PCommunicator):
    """Megatron's P2P communicator whose receive buffers have the packed payload's width: the
    schedule asks for ``(s', b, hidden)`` and gets ``(s', b, payload_width)``, in both
    directions (activations forward, their gradients backward)."""

    def __init__(self, pp_group, config):
        _check_p2p_api_once()
        super().__init__(pp_group=pp_group, config=config)
        self.payload_width = config.payload_width

    def _communicate(self, *, tensor_shape, **kwargs):
        if tensor_shape is not None:
            tensor_shape = (*tuple(tensor_shape)[:-1], self.payload_width)
        return super()._communicate(tensor_shape=tensor_shape, **kwargs)


def _process_groups() -> ProcessGroupCollection:
    """The groups Megatron's schedules use when given their communicator."""
    pgs = ProcessGroupCollection()
    pgs.tp = parallel_state.get_tensor_model_parallel_group()
    pgs.cp = parallel_state.get_context_parallel_group()
    pgs.pp = parallel_state.get_pipeline_model_parallel_group()
    pgs.embd = parallel_state.get_embedding_group(check_initialized=False)
    pgs.pos_embd = parallel_state.get_position_embedding_group(check_initialized=False)
    pgs.dp_cp = parallel_state.get_data_parallel_group(with_context_parallel=True,
                                                       partial_data_parallel=False)
    return pgs


def model_chunks(model) -> List[torch.nn.Module]:
    """This rank's model chunks: ``model`` is one module (no interleaving) or Megatron-LM's
    list of them."""
    return list(model) if isinstance(model, (list, tuple)) else [model]


def forward_backward(*, forward_step_func, data_iterator, model, num_microbatches: int,
                     seq_length: int, micro_batch_size: int, forward_only: bool = False):
    """Megatron's forward/backward schedule for this parallel layout (no pipeline, 1F1B, or
    interleaved over ``model``'s chunks), with the CR-Net payload between stages. ``model``
    is one module or this rank's list of model chunks; ``data_iterator`` is one iterator per
    chunk (a list, as Megatron-LM gives its schedules; the trainer's), or one iterator that
    every chunk shares."""
    chunks = model_chunks(model)
    config = chunks[0].config
    iterators = data_iterator if isinstance(data_iterator, list) else \
        [data_iterator] * len(chunks)
    if len(iterators) != len(chunks):
        raise ValueError(f"{len(iterators)} data iterators for {len(chunks)} model chunks; "
                         "give one per chunk")
    kwargs = dict(forward_step_func=forward_step_func,
                  data_iterator=iterators if len(chunks) > 1 else iterators[0],
                  model=chunks, num_microbatches=num_microbatches, seq_length=seq_length,
                  micro_batch_size=micro_batch_size, forward_only=forward_only)
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        kwargs["p2p_communicator"] = PayloadP2PCommunicator(
            parallel_state.get_pipeline_model_parallel_group(), config)
        kwargs["pg_collection"] = _process_groups()
    with compat.cuda_device_rewrite(), compat.sent_outputs_kept(config):
        return get_forward_backward_func()(**kwargs)
