"""Checksums of a checkpoint's files: taken while the files are written, checked before a
resume or an export reads them, so flipped bytes inside a weight or an optimizer tensor are a
broken checkpoint (moved aside, the previous one used) instead of being trained on.

``checksums.json`` lists, per file of ``iter_N``, SHA-256s of its byte ranges (segments): for a
tensor shard one segment per tensor item, hashed by megatron-core's writer process as it
writes the bytes (``HashingWriter``, left beside the shard as ``NAME.sha256`` and folded into
the manifest when the save is published), so a save never reads its files back; for the small
files (``.metadata``, ``common.pt``, ``metadata.json``) one segment each. A shard whose
writer left no usable record (another megatron-core writer) is hashed after the write instead.

A reader verifies what it needs (``checkpoint.verify``): ``all`` every segment, ``model`` the
small files and the segments that hold model tensors (an export or an evaluation never reads
the optimizer's bytes), ``off`` nothing. The ranks share the hashing (segment ``r, r + w, ...``
on rank ``r`` of ``w``) and agree on the verdict. Checkpoints of earlier versions list one
whole-file SHA-256 per file and are checked file by file.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from crnet_megatron.checkpoint.safe_checkpoint import (
    IncompleteCheckpointError,
    load_metadata,
    model_key,
)
from crnet_megatron.data.safe_files import (
    UnsafePathError,
    read_json,
    write_text,
)

CHECKSUMS = "checksums.json"
SIDECAR = ".sha256"  # NAME.sha256 beside a shard: its writer's segments (removed at publish)
VERIFY_MODES = ("all", "model", "off")
_CHUNK = 1 << 22
MAX_MANIFEST_BYTES = 1 << 26
HASH_WHILE_WRITING = True  # off: every shard is hashed after the write (the benchmark's baseline)

Segment = Tuple[int, Optional[int], str]  # (offset, length or None: to the end, sha256)


class CorruptCheckpointError(IncompleteCheckpointError):
    """A checkpoint file whose bytes are not the ones saved (read as a broken checkpoint)."""


def _world() -> tuple:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class HashingWriter:
    """A shard file being written, hashed as the bytes go by: a new segment starts wherever the
    writer asks for its position (torch's ``_write_item`` does, before and after each item).
    A seek, or a size on disk other than the bytes hashed, voids the record."""

    def __init__(self, path: str):
        self.path, self._f = path, open(path, "wb")
        self._pos, self._start, self._sha = 0, 0, hashlib.sha256()
        self._segments: List[list] = []
        self._valid = True

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self._sha.update(view)
        self._pos += view.nbytes
        return self._f.write(view)

    def tell(self) -> int:
        if self._pos != self._start:
            self._segments.append([self._start, self._pos - self._start, self._sha.hexdigest()])
            self._start, self._sha = self._pos, hashlib.sha256()
        return self._f.tell()

    def seek(self, *args):
        self._valid = False
        return self._f.seek(*args)

    def close(self) -> None:
        if self._f.closed:
            return
        self.tell()
        self._f.close()
        if self._valid and os.path.getsize(self.path) == self._pos:
            write_text(self.path + SIDECAR, json.dumps(self._segments), "checkpoint checksums")

    def __getattr__(self, name):  # fileno, flush, ... of the file itself
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def writer_open(file, mode="r", *args, **kwargs):
    """``open`` for megatron-core's checkpoint writer: shards being written are hashed."""
    if HASH_WHILE_WRITING and mode == "wb" and not args and not kwargs \
            and str(file).endswith(".distcp"):
        return HashingWriter(str(file))
    return open(file, mode, *args, **kwargs)


def sha256_range(path: str, offset: int = 0, length: Optional[int] = None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        left = float("inf") if length is None else length
        while left > 0:
            block = f.read(int(min(_CHUNK, left)))
            if not block:
                break
            digest.update(block)
            left -= len(block)
    return digest.hexdigest()


def _files(path: str) -> List[str]:
    return sorted(name for name in os.listdir(path)
                  if name != CHECKSUMS and not name.endswith(SIDECAR)
                  and os.path.isfile(os.path.join(path, name)))


def _writer_segments(path: str) -> Optional[List[list]]:
    """The segments the writer recorded for ``path``, if they cover the file exactly."""
    try:
        segments = read_json(path + SIDECAR, "checkpoint checksums", MAX_MANIFEST_BYTES)
    except (OSError, ValueError, UnsafePathError):
        return None
    if not isinstance(segments, list) or not segments:
        return None
    end = 0
    for seg in segments:
        if not (isinstance(seg, list) and len(seg) == 3 and seg[0] == end):
            return None
        end += seg[1]
    return segments if end == os.path.getsize(path) else None


def write_checksums(path: str) -> None:
    """Fold this rank's share of the writers' records into the manifest (hashing a file only
    where its writer left none); rank 0 writes ``checksums.json`` (collective)."""
    rank, world = _world()
    mine = {}
    for name in _files(path)[rank::world]:
        full = os.path.join(path, name)
        mine[name] = _writer_segments(full) or [[0, os.path.getsize(full), sha256_range(full)]]
    shares: List[Optional[Dict[str, list]]] = [None] * world
    if world > 1:
        dist.all_gather_object(shares, mine)
    else:
        shares = [mine]
    if rank == 0:
        files = {k: v for share in shares for k, v in (share or {}).items()}
        write_text(os.path.join(path, CHECKSUMS),
                   json.dumps(dict(algorithm="sha256", format=2, files=files), sort_keys=True),
                   "checkpoint checksums")
    if world > 1:
        dist.barrier()
    for name in mine:  # the records are in the manifest now
        if os.path.exists(os.path.join(path, name + SIDECAR)):
            os.remove(os.path.join(path, name + SIDECAR))


def _segments_of(entry) -> List[Segment]:
    if isinstance(entry, str):  # format 1: one whole-file hash
        return [(0, None, entry)]
    if not isinstance(entry, list) or not all(
            isinstance(s, list) and len(s) == 3 and all(isinstance(x, int) and x >= 0
                                                        for x in s[:2])
            and isinstance(s[2], str) for s in entry):
        raise ValueError("a file's entry is not a list of [offset, length, sha256]")
    return [tuple(s) for s in entry]


def _read_manifest(path: str) -> Optional[Dict[str, List[Segment]]]:
    manifest = os.path.join(path, CHECKSUMS)
    if not os.path.lexists(manifest):
        return None
    try:
        data = read_json(manifest, "checkpoint checksums", MAX_MANIFEST_BYTES)
        files = data["files"]
        if data.get("algorithm") != "sha256" or not isinstance(files, dict):
            raise ValueError("unknown algorithm or entries")
        return {str(k): _segments_of(v) for k, v in files.items()}
    except (UnsafePathError, OSError) as e:
        raise CorruptCheckpointError(f"checkpoint {path}: {e}") from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CorruptCheckpointError(f"checkpoint {path}: {CHECKSUMS} is malformed ({e})") \
            from None


def _storage_ranges(path: str, model_only: bool) -> Dict[str, List[Tuple[int, int]]]:
    """{file: [(offset, end)]} of the tensors' bytes, or of the model tensors' only (from the
    checked ``.metadata``)."""
    ranges: Dict[str, List[Tuple[int, int]]] = {}
    metadata = load_metadata(os.path.join(path, ".metadata"))
    for index, info in (metadata.storage_data or {}).items():
        if not model_only or model_key(index.fqn):
            ranges.setdefault(info.relative_path, []).append(
                (info.offset, info.offset + info.length))
    return ranges


def _wanted(path: str, files: Dict[str, List[Segment]], mode: str) -> List[tuple]:
    """(file, segment) pairs to hash: all of them, or those of the small files and those
    overlapping a model tensor. Every file holding what is read must be listed."""
    ranges = _storage_ranges(path, model_only=mode == "model")
    unlisted = sorted(set(ranges) - set(files))
    if unlisted:
        raise CorruptCheckpointError(f"checkpoint {path}: {unlisted[0]} holds tensors and is "
                                     f"not listed in {CHECKSUMS}")
    if mode == "all":
        return [(name, seg) for name in sorted(files) for seg in files[name]]
    wanted = []
    for name in sorted(files):
        for seg in files[name]:
            end = float("inf") if seg[1] is None else seg[0] + seg[1]
            if not name.endswith(".distcp") or any(a < end and seg[0] < b
                                                   for a, b in ranges.get(name, ())):
                wanted.append((name, seg))
    return wanted


def _my_problems(path: str, files: Dict[str, List[Segment]], mode: str) -> List[str]:
    rank, world = _world()
    problems = []
    for name, (offset, length, sha) in _wanted(path, files, mode)[rank::world]:
        full = os.path.join(path, name)
        if os.path.basename(name) != name or not os.path.isfile(full):
            problems.append(f"{name} is missing")
        elif length is not None and offset + length > os.path.getsize(full):
            problems.append(f"{name} is shorter than its checksums say")
        elif sha256_range(full, offset, length) != sha:
            problems.append(f"{name} does not match its checksum")
    return problems


def _size_problems(path: str, files: Dict[str, List[Segment]]) -> List[str]:
    """Bytes a listed file holds beyond (or short of) what its checksums cover: appended data
    would otherwise go unchecked."""
    out = []
    for name, segments in sorted(files.items()):
        full = os.path.join(path, name)
        if os.path.basename(name) != name or not os.path.isfile(full) or \
                any(length is None for _, length, _ in segments):
            continue
        covered = max(offset + length for offset, length, _ in segments)
        if os.path.getsize(full) != covered:
            out.append(f"{name} has {os.path.getsize(full)} bytes, its checksums cover {covered}")
    return out


def _agree(problems: List[str], path: str) -> None:
    """Every rank raises when any rank found a problem (the first one it found, or a pointer
    to another rank's)."""
    rank, world = _world()
    if world > 1:
        bad = torch.tensor([1.0 if problems else 0.0],
                           device="cuda" if torch.cuda.is_available() else "cpu")
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item() and not problems:
            raise CorruptCheckpointError(f"checkpoint {path}: a file does not match its "
                                         "checksum (found by another rank)")
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CorruptCheckpointError(f"checkpoint {path}: {problems[0]}{more}")


def verify_checksums(path: str, mode: str = "all") -> None:
    """Check the segments ``mode`` asks for against ``checksums.json`` (collective when
    distributed); raises ``CorruptCheckpointError`` with the first problem, on every rank.
    A checkpoint without a manifest, and files it does not list, are noted once, not refused."""
    if mode == "off":
        return
    files = _read_manifest(path)
    rank, _ = _world()
    if files is None:
        if rank == 0:
            print(f"NOTE: checkpoint {path} has no {CHECKSUMS}; it is read unverified",
                  file=sys.stderr, flush=True)
        return
    problems = _my_problems(path, files, mode)
    if rank == 0:
        problems += _size_problems(path, files)
    _agree(problems, path)
    extra = sorted(set(_files(path)) - set(files))
    if extra and rank == 0:
        print(f"NOTE: checkpoint {path} holds files its {CHECKSUMS} does not list, not read: "
              f"{', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}", file=sys.stderr,
              flush=True)
