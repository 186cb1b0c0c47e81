"""Megatron distributed checkpoints (``torch_dist``) with a crash-safe ``latest`` pointer.

Layout: ``SAVE/iter_0000100/`` (written as ``iter_0000100.tmp`` and renamed once every rank has
finished) and ``SAVE/latest_checkpointed_iteration.txt``, replaced atomically only after the
rename. A crash during a save therefore leaves ``latest`` at the previous, complete checkpoint.
The model's ``sharded_state_dict`` (CR-Net A/B sharded like their Megatron linears, betas and
row B replicated with TP replica ids) makes checkpoints loadable at another TP/PP layout; the
per-rank RNG state is restored only when the layout is unchanged.
"""

from __future__ import annotations

import glob
import os
import shutil
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state as ps
from megatron.core.dist_checkpointing.mapping import ShardedObject

from .. import cpu_compat

TRACKER = "latest_checkpointed_iteration.txt"


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def read_latest(root: str) -> Optional[int]:
    path = os.path.join(root, TRACKER)
    if not os.path.exists(path):
        return None
    text = open(path).read().strip()
    if not text.isdigit():
        raise ValueError(f"corrupt checkpoint tracker {path}: {text!r} is not an iteration")
    return int(text)


def layout() -> Dict[str, int]:
    return dict(tp=ps.get_tensor_model_parallel_world_size(),
                pp=ps.get_pipeline_model_parallel_world_size(),
                dp=ps.get_data_parallel_world_size())


def _rng_object() -> ShardedObject:
    state = {"torch": torch.get_rng_state(),
             "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    shape = (ps.get_pipeline_model_parallel_world_size(),
             ps.get_tensor_model_parallel_world_size(), ps.get_data_parallel_world_size())
    offset = (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(),
              ps.get_data_parallel_rank())
    return ShardedObject("rng_state", state, shape, offset, replica_id=0)


def _sharded_state(model, optimizer, is_loading: bool, with_rng: bool):
    model_sd = getattr(model, "module", model).sharded_state_dict()  # unwrap Megatron DDP
    state = {"model": model_sd}
    if optimizer is not None:
        # fully_reshardable: distributed-optimizer state loadable at any TP/PP/DP layout
        state["optimizer"] = optimizer.sharded_state_dict(
            model_sd, is_loading=is_loading,
            metadata={"distrib_optim_sharding_type": "fully_reshardable"})
    if with_rng:
        state["rng_state"] = _rng_object()
    return state


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(root: str, iteration: int, model, optimizer, common: Dict[str, Any],
                    keep_last: int) -> str:
    """Save, then rename into place, then move ``latest``; keep the newest ``keep_last``."""
    final = iteration_dir(root, iteration)
    tmp = final + ".tmp"
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if rank0:
        os.makedirs(root, exist_ok=True)
        for stale in glob.glob(os.path.join(root, "iter_*.tmp")):
            shutil.rmtree(stale, ignore_errors=True)
        os.makedirs(tmp)
    _barrier()
    with cpu_compat.cuda_device_rewrite():
        state = _sharded_state(model, optimizer, is_loading=False, with_rng=True)
        state["common"] = dict(common, iteration=iteration, layout=layout())
        dist_checkpointing.save(state, tmp)
    _barrier()
    if rank0:
        if os.path.exists(final):  # re-saving an iteration: replace the old copy last
            shutil.rmtree(final)
        os.replace(tmp, final)
        tracker_tmp = os.path.join(root, TRACKER + ".tmp")
        with open(tracker_tmp, "w") as f:
            f.write(str(iteration))
        os.replace(tracker_tmp, os.path.join(root, TRACKER))
        kept = sorted(glob.glob(os.path.join(root, "iter_[0-9]*[0-9]")))
        for old in kept[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_common(root: str, iteration: Optional[int] = None) -> Optional[Dict[str, Any]]:
    """The non-sharded state of the latest (or given) checkpoint; None when there is none."""
    if iteration is None:
        iteration = read_latest(root)
        if iteration is None:
            return None
    path = iteration_dir(root, iteration)
    if not os.path.isdir(path) or not os.path.exists(os.path.join(path, "metadata.json")):
        raise ValueError(f"checkpoint {path} is missing or incomplete (no metadata.json)")
    try:
        common = dist_checkpointing.load_common_state_dict(path)
    except Exception as e:  # noqa: BLE001 - any read failure is a corrupt checkpoint
        raise ValueError(f"checkpoint {path} is corrupt: {e}") from e
    return dict(common["common"], path=path)


def check_compatible(common: Dict[str, Any], shape: Dict[str, Any]) -> None:
    """A checkpoint of another model shape is refused before anything is loaded."""
    saved = common.get("model_shape", {})
    diff = {k: (saved.get(k), v) for k, v in shape.items() if saved.get(k) != v}
    if diff:
        detail = ", ".join(f"model.{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"checkpoint {common['path']} is for another model shape ({detail})")


def _ensure_optimizer_state(optimizer) -> None:
    """A fresh distributed optimizer has no Adam state, but building its sharded state for
    loading reads the step count; give it placeholder states (as Megatron-LM does), which the
    load then overwrites, like the model parameters."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(opt, DistributedOptimizer) and len(opt.optimizer.state) == 0:
            opt._init_optimizer_states_with_dummy_values()


def load_checkpoint(common: Dict[str, Any], model, optimizer) -> bool:
    """Load model (+ optimizer) state; returns whether the RNG state was restored."""
    same_layout = common.get("layout") == layout()
    with cpu_compat.cuda_device_rewrite():
        if optimizer is not None:
            _ensure_optimizer_state(optimizer)
        state = _sharded_state(model, optimizer, is_loading=True, with_rng=same_layout)
        try:
            loaded = dist_checkpointing.load(state, common["path"])
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"could not load checkpoint {common['path']}: {e}") from e
        getattr(model, "module", model).load_state_dict(loaded["model"])
        if optimizer is not None:
            optimizer.load_state_dict(loaded["optimizer"])
    if same_layout:
        rng = loaded["rng_state"]
        torch.set_rng_state(rng["torch"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return same_layout
