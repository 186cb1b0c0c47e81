"""Writing an export's weights as safetensors shards, one tensor at a time.

``safetensors.torch.save_file`` needs every tensor of a file in memory and serialises them into
one more buffer: a 70B export would hold the model three times. Here the shards are planned
from the tensors' shapes (HF's convention: at most ``max_shard_size`` bytes each, a larger
tensor alone in its shard; ``model.safetensors`` when one shard is enough, else
``model-0000K-of-0000N.safetensors`` and ``model.safetensors.index.json``), each file's header is
written from the plan, then each tensor's bytes as it comes: host memory holds the model once
plus one tensor. The files are the safetensors format (an 8-byte little-endian header length,
the JSON header padded to 8 bytes, the data in header order), read back by the safetensors
library.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import torch

from crnet_megatron.export.modeling_crnet import INDEX, SINGLE

DEFAULT_MAX_SHARD_SIZE = "5GB"  # transformers' default for save_pretrained
_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
           torch.float64: "F64"}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}

Entry = Tuple[str, Tuple[int, ...], torch.dtype]


def parse_size(text: str) -> int:
    """``5GB`` (10^9), ``500MB``, ``2GiB`` (2^30) or a byte count, as transformers reads
    ``max_shard_size``."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", str(text).upper())
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"--max-shard-size {text!r} is not a size such as 5GB, 500MB or "
                         "2GiB")
    return int(float(m.group(1)) * _UNITS[m.group(2) or ""])


def nbytes(entry: Entry) -> int:
    return math.prod(entry[1]) * torch.tensor([], dtype=entry[2]).element_size()


def plan_shards(entries: List[Entry], max_bytes: int) -> List[List[Entry]]:
    """Consecutive tensors grouped into shards of at most ``max_bytes`` (a larger tensor
    alone), in order."""
    shards: List[List[Entry]] = [[]]
    size = 0
    for entry in entries:
        n = nbytes(entry)
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += n
    return shards


def shard_names(count: int) -> List[str]:
    if count == 1:
        return [SINGLE]
    return [f"model-{k:05d}-of-{count:05d}.safetensors" for k in range(1, count + 1)]


def _header(entries: List[Entry], metadata: Optional[Dict[str, str]]) -> bytes:
    header: Dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, shape, dtype in entries:
        n = nbytes((name, shape, dtype))
        header[name] = {"dtype": _DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def _write_tensor(f, tensor: torch.Tensor, entry: Entry) -> None:
    t = tensor.detach().to("cpu", entry[2]).contiguous()
    if tuple(t.shape) != entry[1]:
        raise RuntimeError(f"export: {entry[0]} changed shape while written")
    if t.numel():
        f.write(t.reshape(-1).view(torch.uint8).numpy())


def write_shards(directory: str, tensors: Callable[[], Iterable[Tuple[str, torch.Tensor]]],
                 max_bytes: int, dtype: Optional[torch.dtype] = None,
                 metadata: Optional[Dict[str, str]] = None) -> List[str]:
    """Write ``tensors()`` (called twice: to plan, then to write; the same names and shapes
    both times) into ``directory`` (a fresh directory of the caller's), converted to ``dtype``;
    returns the files written."""
    entries = [(name, tuple(t.shape), dtype or t.dtype) for name, t in tensors()]
    plan = plan_shards(entries, max_bytes)
    names = shard_names(len(plan))
    stream: Iterator[Tuple[str, torch.Tensor]] = iter(tensors())
    for name, shard in zip(names, plan):
        with open(os.path.join(directory, name), "xb") as f:
            f.write(_header(shard, metadata))
            for entry in shard:
                got, tensor = next(stream)
                if got != entry[0]:
                    raise RuntimeError(f"export: expected {entry[0]}, got {got}")
                _write_tensor(f, tensor, entry)
    if len(names) > 1:
        index = {"metadata": {"total_size": sum(nbytes(e) for e in entries)},
                 "weight_map": {e[0]: n for n, shard in zip(names, plan) for e in shard}}
        with open(os.path.join(directory, INDEX), "x") as f:
            json.dump(index, f, indent=2)
        names.append(INDEX)
    return names
