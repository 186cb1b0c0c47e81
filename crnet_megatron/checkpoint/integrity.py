"""Checksums of a checkpoint's files: written when a save is complete, verified before a
resume or an export reads it, so flipped bytes inside a weight or an optimizer tensor are a
broken checkpoint (moved aside, the previous one used) instead of being trained on.

``checksums.json`` maps every file of ``iter_N`` (the shards, ``.metadata``, ``common.pt``,
``metadata.json``) to its SHA-256. The ranks share the hashing: rank ``r`` of ``w`` hashes the
files ``r, r + w, ...`` of the sorted list, and the verdict is all-reduced, so every rank
decides the same and no rank reads the whole checkpoint. Checkpoints written before this file
existed carry none and are read as they are.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from crnet_megatron.checkpoint.safe_checkpoint import IncompleteCheckpointError
from crnet_megatron.data.safe_files import UnsafePathError, check_readable, write_text

CHECKSUMS = "checksums.json"
_CHUNK = 1 << 22
MAX_MANIFEST_BYTES = 1 << 24


class CorruptCheckpointError(IncompleteCheckpointError):
    """A checkpoint file whose bytes are not the ones saved (read as a broken checkpoint)."""


def _world() -> tuple:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _files(path: str) -> List[str]:
    return sorted(name for name in os.listdir(path)
                  if name != CHECKSUMS and os.path.isfile(os.path.join(path, name)))


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(_CHUNK)
            if not block:
                return digest.hexdigest()
            digest.update(block)


def write_checksums(path: str) -> None:
    """Hash this rank's share of ``path``'s files; rank 0 writes the manifest (collective)."""
    rank, world = _world()
    names = _files(path)
    mine = {name: sha256_file(os.path.join(path, name)) for name in names[rank::world]}
    shares: List[Optional[Dict[str, str]]] = [None] * world
    if world > 1:
        dist.all_gather_object(shares, mine)
    else:
        shares = [mine]
    if rank == 0:
        files = {k: v for share in shares for k, v in (share or {}).items()}
        write_text(os.path.join(path, CHECKSUMS),
                   json.dumps(dict(algorithm="sha256", files=files), indent=0, sort_keys=True),
                   "checkpoint checksums")


def _read_manifest(path: str) -> Optional[Dict[str, str]]:
    manifest = os.path.join(path, CHECKSUMS)
    if not os.path.lexists(manifest):
        return None
    try:
        check_readable(manifest, "checkpoint checksums")
    except (UnsafePathError, OSError) as e:
        raise CorruptCheckpointError(f"checkpoint {path}: {e}") from None
    if os.path.getsize(manifest) > MAX_MANIFEST_BYTES:
        raise CorruptCheckpointError(f"checkpoint {path}: {CHECKSUMS} is larger than "
                                     f"{MAX_MANIFEST_BYTES} bytes")
    try:
        with open(manifest, encoding="utf-8") as f:
            data = json.load(f)
        files = data["files"]
        if data.get("algorithm") != "sha256" or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
            raise ValueError("unknown algorithm or entries")
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        raise CorruptCheckpointError(f"checkpoint {path}: {CHECKSUMS} is malformed ({e})") \
            from None
    return files


def _my_problems(path: str, files: Dict[str, str]) -> List[str]:
    rank, world = _world()
    on_disk = set(_files(path))
    problems = [f"{name} is not listed in {CHECKSUMS}" for name in sorted(on_disk - set(files))
                if rank == 0]
    for name in sorted(files)[rank::world]:
        if os.path.basename(name) != name or name not in on_disk:
            problems.append(f"{name} is missing")
        elif sha256_file(os.path.join(path, name)) != files[name]:
            problems.append(f"{name} does not match its checksum")
    return problems


def verify_checksums(path: str) -> None:
    """Every listed file hashes to its saved checksum (collective when distributed: each rank
    checks its share and the ranks agree); raises ``CorruptCheckpointError`` with the first
    problem, on every rank."""
    files = _read_manifest(path)
    if files is None:
        return
    problems = _my_problems(path, files)
    rank, world = _world()
    if world > 1:
        bad = torch.tensor([1.0 if problems else 0.0],
                           device="cuda" if torch.cuda.is_available() else "cpu")
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item() and not problems:
            raise CorruptCheckpointError(f"checkpoint {path}: a file does not match its "
                                         "checksum (found by another rank)")
    if problems:
        raise CorruptCheckpointError(f"checkpoint {path}: {problems[0]}"
                                     f"{f' (and {len(problems) - 1} more)' if len(problems) > 1 else ''}")
