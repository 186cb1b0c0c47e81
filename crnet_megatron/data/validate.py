"""Start-up checks of untrusted data files, in bounded time and memory.

* ``validate_prefix``: a Megatron indexed dataset (``.idx`` + ``.bin``) is checked before
  megatron-core maps it: header, version, dtype, counts against the file size (a flipped count
  would make megatron-core allocate without bound), sequence lengths and pointers consistent
  and monotone, document boundaries monotone, ``.bin`` exactly as long as the index implies,
  and token ids below the vocabulary on an evenly spread sample of the ``.bin`` (never the
  whole file; every batch is checked again in training).

The dataset index caches megatron-core builds from them are checked in ``index_cache``.
"""

from __future__ import annotations

import os
import struct
from typing import List, Optional

import numpy as np

IDX_MAGIC = b"MMIDIDX\x00\x00"
_HEADER = len(IDX_MAGIC) + 8 + 1 + 8 + 8
# megatron.core.datasets.indexed_dataset.DType codes
_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 8: np.uint16}
_SAMPLE_CHUNKS, _CHUNK_TOKENS = 64, 1 << 16


def _fail(path: str, problem: str):
    raise ValueError(f"data file {path}: {problem}")


def read_index(prefix: str):
    """Validated (dtype, sequence lengths, sequence pointers, document indices) of a prefix."""
    idx, bin_path = prefix + ".idx", prefix + ".bin"
    for path in (idx, bin_path):
        if not os.path.exists(path):
            raise FileNotFoundError(f"data prefix {prefix!r}: {path} does not exist (make it "
                                    "with crnet-preprocess)")
    for path in (idx, bin_path):
        if not os.path.isfile(path):  # a FIFO or device would block or never end
            _fail(path, "not a regular file (a FIFO, device or directory)")
    size = os.path.getsize(idx)
    with open(idx, "rb") as f:
        head = f.read(_HEADER)
    if len(head) < _HEADER or head[:len(IDX_MAGIC)] != IDX_MAGIC:
        _fail(idx, "not a Megatron index file (bad header; corrupt or another format)")
    version, code, seqs, docs = struct.unpack("<QBQQ", head[len(IDX_MAGIC):])
    if version != 1:
        _fail(idx, f"index version {version}; only version 1 is supported")
    if code not in _DTYPES:
        _fail(idx, f"token dtype code {code} is not an integer type "
                   f"(valid: {sorted(_DTYPES)})")
    expect = _HEADER + 12 * seqs + 8 * docs
    if expect != size:
        _fail(idx, f"{seqs} sequences and {docs} document boundaries need {expect} bytes, "
                   f"the file has {size} (corrupt or truncated)")
    dtype = np.dtype(_DTYPES[code])
    lengths = np.memmap(idx, np.int32, "r", _HEADER, (seqs,))
    pointers = np.memmap(idx, np.int64, "r", _HEADER + 4 * seqs, (seqs,))
    doc_idx = np.memmap(idx, np.int64, "r", _HEADER + 12 * seqs, (docs,))
    if seqs == 0:
        _fail(idx, "holds no sequences")
    if (lengths < 0).any():
        _fail(idx, "negative sequence length")
    if pointers[0] != 0 or (np.diff(pointers) != lengths[:-1].astype(np.int64) * dtype.itemsize).any():
        _fail(idx, "sequence pointers do not follow the sequence lengths (corrupt)")
    if docs < 2 or doc_idx[0] != 0 or doc_idx[-1] != seqs or (np.diff(doc_idx) < 0).any():
        _fail(idx, "document boundaries are not monotone from 0 to the sequence count")
    bin_bytes = int(pointers[-1]) + int(lengths[-1]) * dtype.itemsize
    if os.path.getsize(bin_path) != bin_bytes:
        _fail(bin_path, f"has {os.path.getsize(bin_path)} bytes, its index {idx} implies "
                        f"{bin_bytes} (truncated, or paired with another corpus's index)")
    return dtype, lengths, pointers, doc_idx


def validate_prefix(prefix: str, vocab_size: int) -> None:
    """Raise one clear error naming the file when a prefix is unusable with this vocabulary."""
    dtype, _, _, _ = read_index(prefix)
    bin_path = prefix + ".bin"
    if np.iinfo(dtype).max < vocab_size and np.iinfo(dtype).min >= 0:
        return  # no id this dtype can hold is out of range
    tokens = os.path.getsize(bin_path) // dtype.itemsize
    data = np.memmap(bin_path, dtype, "r")
    step = max(1, tokens // _SAMPLE_CHUNKS)
    for start in range(0, tokens, step):
        chunk = np.asarray(data[start:start + _CHUNK_TOKENS])
        lo, hi = int(chunk.min()), int(chunk.max())
        if lo < 0 or hi >= vocab_size:
            bad = lo if lo < 0 else hi
            _fail(bin_path, f"token id {bad} near token {start} is outside the tokenizer's "
                            f"vocabulary [0, {vocab_size}) (another tokenizer's data?)")


def check_batch_tokens(tokens, vocab_size: int, prefixes) -> None:
    """Every training batch: ids must index the embedding (a clear error, not IndexError)."""
    hi, lo = int(tokens.max()), int(tokens.min())
    if hi >= vocab_size or lo < 0:
        raise ValueError(f"a batch from {list(prefixes)} holds token id {hi if hi >= vocab_size else lo}"
                         f", outside the tokenizer's vocabulary [0, {vocab_size}); the data "
                         "was made with another tokenizer")


def tokenizer_file(path: str) -> str:
    """An HF tokenizer: a ``tokenizer.json`` file, or a directory holding one (what
    ``save_pretrained`` writes)."""
    if os.path.isdir(path):
        inner = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(inner):
            raise FileNotFoundError(f"tokenizer directory {path!r} has no tokenizer.json (only "
                                    "fast HF tokenizers are read)")
        path = inner
    if not os.path.exists(path):
        raise FileNotFoundError(f"tokenizer file {path!r} does not exist")
    check_tokenizer_regexes(path)
    return path


MAX_TOKENIZER_BYTES = 1 << 28
MAX_REGEX_CHARS = 2048


def check_tokenizer_regexes(path: str) -> None:
    """The regular expressions a ``tokenizer.json`` runs on every line of text (pre-tokenizer
    and normalizer ``Regex`` patterns) are bounded: short, and with no group that repeats
    something itself repeating without bound (``(a+)+``, ``(\\w*)*``), the shape whose matching
    time explodes on a crafted line. Real tokenizers' patterns (GPT-2, LLaMA-3) pass."""
    from crnet_megatron.data.safe_files import check_readable, loads_json

    check_readable(path, "tokenizer file")
    if os.path.getsize(path) > MAX_TOKENIZER_BYTES:
        raise ValueError(f"tokenizer file {path!r} is {os.path.getsize(path)} bytes, more than "
                         f"{MAX_TOKENIZER_BYTES}")
    try:
        with open(path, "rb") as f:
            todo = [loads_json(f.read(), "the file")]
    except ValueError as e:
        raise ValueError(f"tokenizer file {path!r} is not a valid HF tokenizers JSON ({e})") \
            from None
    while todo:
        node = todo.pop()
        if isinstance(node, dict):
            pattern = node.get("Regex")
            if isinstance(pattern, str):
                problem = regex_problem(pattern)
                if problem:
                    raise ValueError(f"tokenizer file {path!r}: the pattern {pattern[:80]!r} "
                                     f"{problem}; refusing a tokenizer whose matching time can "
                                     "explode on crafted text")
            todo.extend(node.values())
        elif isinstance(node, list):
            todo.extend(node)


def regex_problem(pattern: str) -> Optional[str]:
    """Why ``pattern`` could take exponential (or high-polynomial) time (None: it cannot, by
    this check): a group repeated without bound that itself repeats without bound (``(a+)+``),
    or that can match one text in several ways (an alternation or an optional inside:
    ``(a|a?)+``); a group that repeats without bound, repeated a counted number of times
    (``(.*a){12}``)."""
    if len(pattern) > MAX_REGEX_CHARS:
        return f"is longer than {MAX_REGEX_CHARS} characters"
    groups: List[List[bool]] = []  # per open group: [repeats without bound, ambiguous]
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "\\":
            i += 2
            continue
        if c == "[":  # a character class is one atom
            i = pattern.find("]", i + 2 if pattern[i + 1:i + 2] == "]" else i + 1)
            i = n if i < 0 else i + 1
            continue
        if c == "(":
            groups.append([False, False])
        elif c == ")" and groups:
            unbounded, ambiguous = groups.pop()
            if groups:
                groups[-1][0] |= unbounded
                groups[-1][1] |= ambiguous
            i += 1
            if _unbounded_at(pattern, i) and unbounded:
                return "repeats a group that itself repeats without bound"
            if _unbounded_at(pattern, i) and ambiguous:
                return "repeats without bound a group that can match a text in several ways"
            if _counted_at(pattern, i) and unbounded:
                return "repeats a counted number of times a group that repeats without bound"
            continue
        elif groups and c == "|":
            groups[-1][1] = True
        elif groups and c == "?" and i > 0 and pattern[i - 1] not in "(*+?}":
            groups[-1][1] = True
        elif _unbounded_at(pattern, i) and groups:
            groups[-1][0] = True
        i += 1
    return None


def _counted_at(pattern: str, i: int) -> bool:
    """A ``{n}`` or ``{n,m}`` with more than one repeat at ``i``."""
    if i >= len(pattern) or pattern[i] != "{":
        return False
    close = pattern.find("}", i)
    counts = pattern[i + 1:close].split(",") if close > 0 else []
    return bool(counts) and all(x.strip().isdigit() for x in counts) and \
        max(int(x) for x in counts) > 1


def _unbounded_at(pattern: str, i: int) -> bool:
    if i >= len(pattern):
        return False
    if pattern[i] in "*+":
        return True
    if pattern[i] == "{":
        close = pattern.find("}", i)
        return close > 0 and pattern[i + 1:close].endswith(",")
    return False
