"""Process groups: torch.distributed (env://, torchrun or Slurm's task variables) and
Megatron-Core's parallel state, seeded the same on every rank (the plan: ``parallel/__init__``).
On CPU the backend is gloo and ``compat`` is activated; on CUDA it is NCCL and nothing is
adapted."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from crnet_megatron.parallel import compat
from crnet_megatron.parallel.launch import free_port, rank_env_from_slurm


def init_distributed(tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
                     seed: int = 1234, timeout_minutes: int = 10,
                     virtual_pipeline_model_parallel_size=None) -> None:
    """Initialise torch.distributed (env:// as set by torchrun) and Megatron's groups, their
    collectives timing out after ``timeout_minutes`` (``parallel.distributed_timeout_minutes``,
    Megatron's ``--distributed-timeout-minutes``)."""
    compat.activate()
    if not dist.is_initialized():
        rank_env_from_slurm()
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ and os.environ.get("WORLD_SIZE", "1") == "1":
            os.environ["MASTER_PORT"] = str(free_port())  # two single runs on one host
        os.environ.setdefault("MASTER_PORT", "29500")
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        try:
            dist.init_process_group(backend=backend,
                                    timeout=datetime.timedelta(minutes=timeout_minutes))
        except RuntimeError as e:
            if "EADDRINUSE" not in str(e) and "address already in use" not in str(e):
                raise
            raise OSError(
                f"MASTER_PORT={os.environ['MASTER_PORT']} on MASTER_ADDR="
                f"{os.environ['MASTER_ADDR']} is already in use (another job or process listens "
                "there); set MASTER_PORT to a free port") from None
    world = dist.get_world_size()
    if world % (tensor_model_parallel_size * pipeline_model_parallel_size):
        raise ValueError(
            f"world size {world} is not divisible by tensor_model_parallel_size="
            f"{tensor_model_parallel_size} x pipeline_model_parallel_size="
            f"{pipeline_model_parallel_size}")
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
        distributed_timeout_minutes=timeout_minutes)
    set_seed(seed)


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is true on any rank (one MAX all-reduce)."""
    t = torch.tensor([1.0 if flag else 0.0],
                     device="cuda" if torch.cuda.is_available() else "cpu")
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def run_id_from_rank0(run_id: str) -> str:
    """Rank 0's run id (hex) on every rank: one id for the run, not one per rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return run_id
    device = "cuda" if torch.cuda.is_available() else "cpu"
    raw = torch.tensor(list(bytes.fromhex(run_id)), dtype=torch.uint8, device=device)
    dist.broadcast(raw, src=0)
    return bytes(raw.tolist()).hex()


def set_seed(seed: int) -> None:
    """Same seed on every rank (TP init draws full master weights on CPU, then shards) and
    Megatron's RNG tracker (used by the SP embedding scatter) seeded as Megatron does."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def destroy_distributed() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def _partial_over_tp(param) -> bool:
    """A replicated parameter whose gradient each TP rank holds only part of: marked
    ``partial_over_tp`` (the column betas) or ``sequence_parallel`` (set only under SP)."""
    return bool(getattr(param, "partial_over_tp", False) or getattr(param, "sequence_parallel",
                                                                     False))


def _sum_over_tp(grads) -> None:
    """One coalesced all-reduce over TP of ``grads``, in place."""
    if not grads or parallel_state.get_tensor_model_parallel_world_size() == 1:
        return
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=parallel_state.get_tensor_model_parallel_group())
    for g, s in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        g.copy_(s)


def sync_partial_grads(model: torch.nn.Module) -> None:
    """Sum over TP the partial gradients of an unwrapped model (tests, benchmarks):
    what ``finalize_grads`` does for DDP-wrapped ones."""
    _sum_over_tp([p.grad for p in model.parameters() if _partial_over_tp(p) and p.grad is not None])


def finalize_grads(model, *args, **kwargs) -> None:
    """Megatron's ``finalize_model_grads``, then the partial gradients it does not sum: without
    SP, the column betas (one coalesced all-reduce per step; under SP they carry the
    ``sequence_parallel`` mark and Megatron sums them with the norms)."""
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.utils import get_model_config

    finalize_model_grads(model, *args, **kwargs)
    if get_model_config(model[0]).sequence_parallel:
        return
    _sum_over_tp([p.main_grad for chunk in model for p in chunk.parameters()
                  if getattr(p, "partial_over_tp", False) and p.requires_grad])
