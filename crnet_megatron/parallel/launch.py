"""The launch this process is part of, read from the environment alone (torchrun's variables, or
Slurm's when ``srun`` starts one task per GPU): no torch, so ``crnet-train --dry-run`` and the
start-up checks answer before megatron-core is imported."""

from __future__ import annotations

import os
import socket
import sys

_NOTED = False


def rank_env_from_slurm() -> None:
    """``srun`` with one task per GPU (as Megatron-LM launches; no elastic agent between Slurm's
    SIGTERM and the trainer): take RANK / WORLD_SIZE / LOCAL_RANK from Slurm's task variables
    when no launcher has set them, and only inside a job step (``SLURM_STEP_ID``): a trainer
    started in an allocation without ``srun`` (an ``salloc`` shell, a batch script's own line)
    sees the allocation's ``SLURM_NTASKS`` but no step, runs as one process and says so,
    rather than waiting for ranks that never come."""
    global _NOTED
    if "RANK" in os.environ:
        return
    if "SLURM_STEP_ID" in os.environ:
        tasks = int(os.environ.get("SLURM_STEP_NUM_TASKS", os.environ.get("SLURM_NTASKS", "1")))
        if tasks > 1:
            os.environ["RANK"] = os.environ["SLURM_PROCID"]
            os.environ["WORLD_SIZE"] = str(tasks)
            os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
        return
    allocated = int(os.environ.get("SLURM_NTASKS", "1") or 1)
    if allocated > 1 and not _NOTED:
        _NOTED = True
        print(f"note: inside Slurm job {os.environ.get('SLURM_JOB_ID', '?')} ({allocated} tasks) "
              "but not in a job step: running as one process; start it with srun to use "
              f"all {allocated}", file=sys.stderr, flush=True)


def layout_from_env(tensor_model_parallel_size: int, pipeline_model_parallel_size: int) -> dict:
    """The launch this process is part of, from the environment alone (no process group)."""
    rank_env_from_slurm()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
    if world % (tp * pp):
        raise ValueError(f"world size {world} is not divisible by tensor_model_parallel_size="
                         f"{tp} x pipeline_model_parallel_size={pp}")
    return dict(rank=int(os.environ.get("RANK", "0")), local_rank=int(os.environ.get(
        "LOCAL_RANK", "0")), world=world, tp=tp, pp=pp, dp=world // (tp * pp),
        master=f"{os.environ.get('MASTER_ADDR', '127.0.0.1')}:{os.environ.get('MASTER_PORT', 'auto')}")


def free_port() -> int:
    """A TCP port nobody listens on now (for a single-process run's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def world_size() -> int:
    """Processes in this launch (1 when started alone)."""
    rank_env_from_slurm()
    return int(os.environ.get("WORLD_SIZE", "1"))
