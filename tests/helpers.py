"""Shared test helpers: tiny configs, a spawn-based multi-process runner with a hard timeout,
and loading full (TP=1) weights into a TP-sharded model."""

from __future__ import annotations

import os
import socket
import tempfile
import traceback
import warnings
from typing import Callable, Dict

import torch
import torch.multiprocessing as mp

VOCAB, SEQ, BATCH = 96, 16, 2


def scaled(expected: torch.Tensor, rtol: float) -> Dict[str, float]:
    """Tolerances for an fp32 comparison that scale with the tensor: ``rtol`` relative, and
    ``rtol`` x the expected tensor's largest magnitude absolute (a sum's round-off scales with
    its terms, not with the one element it lands in), never a fixed floor such as 1e-5, which
    one CPU's summation order can cross and another's not."""
    return dict(rtol=rtol, atol=rtol * float(expected.detach().abs().max()) if expected.numel()
                else 0.0)


def tiny_config(**overrides):
    from crnet_megatron import CRNetConfig

    kw = dict(num_layers=3, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
              num_query_groups=2, crnet_rank=16, use_cpu_initialization=True)
    kw.update(overrides)
    return CRNetConfig(**kw)


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    pos = torch.arange(SEQ)[None].expand(BATCH, -1)
    return ids, pos, labels


def load_full_weights(model, full: Dict[str, torch.Tensor]):
    """Copy TP=1 weights into this rank's shards."""
    from megatron.core import parallel_state as ps

    from crnet_megatron.model.tp_layout import shard_for_tp, tp_split_dim

    r, t = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(shard_for_tp(tp_split_dim(p, name), full[name], r, t))


def randomize_betas(model, seed: int = 7, near_threshold: bool = True, mixed_signs: bool = True):
    """Betas of both signs, as training leaves them (beta is learnable and crosses zero): the
    k-th beta element has sign (-1)^k, |beta| in [0.3, 1.3], and (``near_threshold``) every
    fourth one sits at 2-3x the default ``crnet_recompute_min_scale`` (1e-2), close to where
    recompute stops inverting."""
    g = torch.Generator().manual_seed(seed)
    k = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("beta"):
                n = p.numel()
                idx = torch.arange(k, k + n, dtype=torch.float32)
                mag = 0.3 + torch.rand(n, generator=g)
                mag = torch.where((idx % 4 == 3) & near_threshold, 0.02 + 0.01 * torch.rand(n, generator=g), mag)
                sign = 1.0 - 2.0 * (idx % 2) if mixed_signs else torch.ones(n)
                p.copy_((sign * mag).view_as(p))
                k += n


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, fn, args, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    try:
        result = fn(rank, world, *args)
        torch.save({"ok": True, "result": result}, os.path.join(out_dir, f"{rank}.pt"))
    except BaseException:  # noqa: BLE001 - report any failure to the parent
        torch.save({"ok": False, "error": traceback.format_exc()},
                   os.path.join(out_dir, f"{rank}.pt"))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn: Callable, world: int, *args, timeout: float = 240.0):
    """Run ``fn(rank, world, *args)`` in ``world`` spawned processes (gloo); return the results.

    A process still alive after ``timeout`` seconds (a hung collective) is killed and the test
    fails; every child is reaped before returning.
    """
    ctx = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory() as out_dir:
        procs = [ctx.Process(target=_worker, args=(r, world, port, fn, args, out_dir))
                 for r in range(world)]
        for p in procs:
            p.start()
        import time

        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        hung = [i for i, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(10)
        if hung:
            raise TimeoutError(f"ranks {hung} did not finish within {timeout}s (hung collective?)")
        results = []
        for r in range(world):
            path = os.path.join(out_dir, f"{r}.pt")
            if not os.path.exists(path):
                raise RuntimeError(f"rank {r} died without a result (exit code {procs[r].exitcode})")
            res = torch.load(path, weights_only=False)
            if not res["ok"]:
                raise RuntimeError(f"rank {r} failed:\n{res['error']}")
            results.append(res["result"])
        return results


def read_common(ckpt) -> dict:
    """A checkpoint's common state, in either megatron-core layout (``read_common_state``)."""
    from crnet_megatron.checkpoint.safe_checkpoint import read_common_state

    return read_common_state(str(ckpt))


def write_common(ckpt, payload, as_item: bool = False) -> None:
    """Replace a checkpoint's common state with ``payload`` in the layout it has: ``common.pt``
    (megatron-core 0.16), or (0.17+, or ``as_item``) the ``common_state/shard_0_1`` bytes item,
    torch.save'd as ``[payload]`` at the end of a shard and pointed at by ``.metadata``
    (``common.pt`` removed). ``checksums.json`` goes too: a hand edit leaves none."""
    import io
    import pickle
    from pathlib import Path

    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata,
        MetadataIndex,
    )

    from crnet_megatron.checkpoint.safe_checkpoint import (
        COMMON_STATE_ITEM,
        load_metadata,
    )

    ckpt = Path(ckpt)
    (ckpt / "checksums.json").unlink(missing_ok=True)
    if (ckpt / "common.pt").exists() and not as_item:
        torch.save(payload, ckpt / "common.pt")
        return
    shard = sorted(ckpt.glob("*.distcp"))[0]
    buf = io.BytesIO()
    torch.save([payload], buf)
    offset = shard.stat().st_size
    with open(shard, "ab") as f:
        f.write(buf.getvalue())
    md = load_metadata(str(ckpt / ".metadata"))
    md.state_dict_metadata[COMMON_STATE_ITEM] = BytesStorageMetadata()
    md.storage_data[MetadataIndex(COMMON_STATE_ITEM)] = _StorageInfo(shard.name, offset,
                                                                     len(buf.getvalue()))
    (ckpt / ".metadata").write_bytes(pickle.dumps(md))
    (ckpt / "common.pt").unlink(missing_ok=True)
