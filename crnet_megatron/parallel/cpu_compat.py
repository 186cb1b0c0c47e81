"""The one place where megatron-core 0.16.1's CUDA-only corners are adapted for CPU/gloo.

``activate()`` does nothing when CUDA is available, so GPU runs use megatron-core unchanged.
Without CUDA it makes these adaptations (file:line are megatron-core 0.16.1):

1. ``torch.cuda.current_device()`` answers the CPU device. Megatron allocates with it in
   ``models/common/embeddings/rotary_pos_embedding.py:162`` (RoPE ``inv_freq``),
   ``core/utils.py:631`` (``GlobalMemoryBuffer``, used by sequence parallel gathers) and
   ``pipeline_parallel/p2p_communication.py:313,321`` (receive buffers).
2. ``torch.cuda.synchronize()`` is a no-op (``p2p_communication.py:242,398``,
   ``dist_checkpointing/strategies/filesystem_async.py:230``).
3. The CUDA RNG state get/set used by ``tensor_parallel/random.py:55,235`` (RNG tracker,
   ``tensor_parallel.checkpoint``) falls through to the CPU generator.
4. A ``TorchFunctionMode`` (``cuda_device_rewrite()``) rewrites hard-coded ``device="cuda"``
   arguments to the CPU, makes ``Tensor.cuda()`` an identity and lets ``Tensor.type()`` report
   CPU tensors as ``torch.cuda.*`` (the CUDA-type asserts of ``optimizer/clip_grads.py:167`` and
   ``optimizer/distrib_optimizer.py:~415-431``); entered only around calls that need it
   (``pipeline_parallel/schedules.py:2138``, ``optimizer/optimizer.py:907``, DDP and optimizer
   construction, ``optimizer.step``, ``finalize_model_grads``).
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

_ACTIVE = False


def cuda_available() -> bool:
    return torch.cuda.is_available()


def activate() -> bool:
    """Apply the CPU adaptations once; returns True when they are active."""
    global _ACTIVE
    if _ACTIVE:
        return True
    if cuda_available():
        return False
    cpu = torch.device("cpu")
    torch.cuda.current_device = lambda: cpu
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.manual_seed = lambda seed: None
    torch.cuda.manual_seed_all = lambda seed: None
    torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    torch.cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)

    from megatron.core.tensor_parallel import random as tp_random

    tp_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    tp_random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    _ACTIVE = True
    return True


def _is_cuda(device) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, int)


class _CudaToCpu(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # type checks such as ``param.grad.type() == 'torch.cuda.FloatTensor'``
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if args[0].device.type == "cpu" else name
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


def cuda_device_rewrite():
    """Context manager: rewrite device='cuda' to CPU (a no-op context on CUDA machines)."""
    if cuda_available():
        return contextlib.nullcontext()
    return _CudaToCpu()
