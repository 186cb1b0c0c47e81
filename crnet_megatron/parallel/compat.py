"""The one place where megatron-core (0.16.1 ... 0.19.x) is mended: one fix that applies on
every device, and its CUDA-only corners adapted for CPU/gloo.

``activate()`` applies item 5 everywhere (GPU runs without Apex/TE use torch's Adam too) and,
only without CUDA, items 1-4 and 6, so GPU runs otherwise use megatron-core unchanged. Each is
gated on the megatron-core version it was written against (``MENDED``; file:line are
megatron-core 0.16.1):

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
5. (every device) The distributed optimizer without Apex/TE runs on torch's Adam,
   which keeps a per-parameter ``step`` tensor. Its loader gives every parameter one shared
   ``step`` tensor (``optimizer/distrib_optimizer.py:822``; Adam would then add to it once per
   parameter), then copies over it a ``step`` that the fully reshardable state does not hold
   (``:938``, a KeyError) or that is the placeholder state's (``dp_reshardable``, ``:1652``).
   ``_torch_adam_distributed_optimizer()`` keeps each parameter's own, restored step.
6. gloo's ``isend`` reads the tensor's storage when the transfer runs, but the interleaved
   schedule swaps a sent output's storage for a one-element placeholder right after posting an
   overlapped send (``deallocate_output_tensor``, ``pipeline_parallel/schedules.py:1497,1522``), so
   the peer could receive the placeholder's neighbourhood. ``sent_outputs_kept(config)`` keeps
   sent outputs whole during a schedule with overlapped P2P (CPU memory only; NCCL's sends are
   ordered on the stream before the storage is reused).
7. (0.19 and newer) ``start_grad_sync`` asks ``torch.cuda.current_stream()`` for the stream to
   wait on CUDA-graph events (``distributed/param_and_grad_buffer.py:632`` in 0.19.2), with or
   without CUDA: without it, a null stream answers.
8. (0.17 and newer) async saves default to nvidia-resiliency-ext's writer
   (``async_strategy="nvrx"``); ``async_save_options()`` asks for megatron-core's own.
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

_ACTIVE = False
# the megatron-core releases these mends were written against and tested with (0.16.1 and
# 0.19.2; the code they mend is the same in 0.17 and 0.18): the package's dependency range
MENDED = ("0.16.1", "0.20")


def _megatron_series_mended() -> bool:
    import megatron.core
    from packaging.version import Version

    low, high = MENDED
    return Version(low) <= Version(megatron.core.__version__) < Version(high)


def megatron_at_least(version: str) -> bool:
    """Whether the installed megatron-core is ``version`` or newer (for version-gated mends)."""
    import megatron.core
    from packaging.version import Version

    return Version(megatron.core.__version__) >= Version(version)


class _NullStream:
    """What ``torch.cuda.current_stream()`` answers without CUDA: waits and records are
    no-ops (CPU work is ordered already)."""

    def wait_event(self, *args, **kwargs):
        return None

    def wait_stream(self, *args, **kwargs):
        return None

    def record_event(self, *args, **kwargs):
        return None

    def synchronize(self):
        return None


def cuda_available() -> bool:
    return torch.cuda.is_available()


def flushes_denormals(enabled: bool) -> bool:
    """Whether a run flushes subnormal floats to zero: ``optimizer.cpu_flush_denormal``
    (``enabled``) on a CPU. Subnormal floats (below 1.2e-38 in fp32) cost x86 cores tens of
    times a normal operation; CR-Net's q/k chains sharpen attention as training goes on, its
    backward then produces subnormal gradients, and the chains' backward carries them down the
    model: the step slowed by about 40% within 20 iterations (dense, without chains, has none).
    Flushing them to zero changes results only below 1.2e-38."""
    return bool(enabled) and not cuda_available()


def activate() -> bool:
    """Apply the CPU adaptations once; returns True when they are active."""
    global _ACTIVE
    if _ACTIVE:
        return True
    if _megatron_series_mended():
        _torch_adam_distributed_optimizer()  # on a GPU without Apex/TE too
    if cuda_available():
        return False
    cpu = torch.device("cpu")
    torch.cuda.current_device = lambda: cpu
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.manual_seed = lambda seed: None
    torch.cuda.manual_seed_all = lambda seed: None
    torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    torch.cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)

    if megatron_at_least("0.19"):  # item 7
        torch.cuda.current_stream = lambda *a, **k: _NullStream()
    from megatron.core.tensor_parallel import random as tp_random

    tp_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    tp_random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    _ACTIVE = True
    return True


def async_save_options() -> dict:
    """Item 8 (0.17 and newer): ``dist_checkpointing.save`` writes async saves through
    nvidia-resiliency-ext unless asked for ``async_strategy="mcore"``, megatron-core's own
    writer, which the async queue here drives."""
    import inspect

    from megatron.core import dist_checkpointing

    params = inspect.signature(dist_checkpointing.save).parameters
    return {"async_strategy": "mcore"} if "async_strategy" in params else {}


def route_checkpoint_writes(opener) -> None:
    """megatron-core's checkpoint writer opens each shard it writes with the builtin ``open``
    (``dist_checkpointing/strategies/filesystem_async.py:383``, ``write_preloaded_data``, in
    the writer process): route those opens through ``opener`` (the checkpoint wing hashes the
    bytes as they are written). Any version: a writer that opens otherwise leaves no record,
    and its files are then hashed after the write."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    filesystem_async.open = opener


def _torch_adam_distributed_optimizer() -> None:
    from megatron.core.optimizer import distrib_optimizer as do

    cls = do.DistributedOptimizer
    if do.HAVE_APEX_OR_TE or getattr(cls, "_crnet_mended", False):
        return
    set_states, load_state_dict = cls._set_main_param_and_optimizer_states, cls.load_state_dict

    def _set_states(self, model_param, tensors):
        # the step count was restored from the param groups just before; a source's own
        # "step" is absent (fully_reshardable) or the placeholder state's (dp_reshardable)
        group, order = self.model_param_group_index_map[model_param]
        state = self.optimizer.state[self.optimizer.param_groups[group]["params"][order]]
        tensors = {k: v for k, v in tensors.items() if k != "step"}
        if "step" in state:
            tensors["step"] = state["step"]
        set_states(self, model_param, tensors)

    def _load_state_dict(self, state_dict):
        load_state_dict(self, state_dict)
        for state in self.optimizer.state.values():  # one step tensor per parameter
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()

    cls._set_main_param_and_optimizer_states = _set_states
    cls.load_state_dict = _load_state_dict
    cls._crnet_mended = True


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


@contextlib.contextmanager
def sent_outputs_kept(config):
    """Item 6: without CUDA, a schedule with overlapped P2P does not deallocate sent outputs."""
    if cuda_available() or not (config.overlap_p2p_comm and config.deallocate_pipeline_outputs):
        yield
        return
    config.deallocate_pipeline_outputs = False
    try:
        yield
    finally:
        config.deallocate_pipeline_outputs = True
