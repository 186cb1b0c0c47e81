"""The dataset index caches megatron-core builds (``data.cache_dir/index_cache``), checked
before and after it reads them: they are derived data, so a cache that is cut short or
implausible is removed with a line and built again; one that could run code is refused.

* ``check_index_cache``: megatron-core loads its caches with ``numpy.load(allow_pickle=True)``;
  a file whose header is not a plain numeric array (an object array runs code when loaded) is
  refused before megatron-core reads it. With ``repair``, a cache whose data is shorter than its
  header says (a kill or a full disk during its write) is removed with its set.
* ``blend_problem``: a loaded blend names only its datasets and samples they have.
* ``index_problem``: a loaded GPTDataset's indices are what its builder makes: the shuffle
  index a permutation of the samples, the document index every document of the split equally
  often, and consecutive sample boundaries exactly ``seq_length`` tokens apart. (An all-zero
  cache is numerically valid and would train on one repeated sample.) O(n) time and n bytes.
"""

from __future__ import annotations

import glob
import os
from typing import List, Optional

import numpy as np

from crnet_megatron.data.safe_files import check_readable


def _header(path: str):
    with open(path, "rb") as f:
        major, _ = np.lib.format.read_magic(f)
        read = (np.lib.format.read_array_header_1_0 if major == 1
                else np.lib.format.read_array_header_2_0)
        shape, _, dtype = read(f)
        return shape, dtype, f.tell()


def cache_set(path: str) -> List[str]:
    """The files of one cached index (``HASH-CLASS-SPLIT-*``) that ``path`` belongs to."""
    base = os.path.basename(path).rsplit("-", 1)[0]
    return sorted(glob.glob(os.path.join(glob.escape(os.path.dirname(path)), base + "-*")))


def remove_cache_set(path: str, why: str) -> None:
    for name in cache_set(path):
        os.remove(name)
    print(f"dataset index cache {path} {why}; removed its set, it is built again", flush=True)


def check_index_cache(cache_dir: str, repair: bool = False) -> None:
    """Refuse caches that are not plain numeric arrays; with ``repair`` remove cut-short ones."""
    for path in sorted(glob.glob(os.path.join(glob.escape(cache_dir), "**", "*.npy"),
                                 recursive=True)):
        if not os.path.exists(path):  # its set was removed as cut short
            continue
        check_readable(path, "dataset index cache")  # a FIFO named *.npy would block start-up
        try:
            shape, dtype, offset = _header(path)
        except Exception as e:  # noqa: BLE001 - any unreadable header is refused
            raise ValueError(f"dataset index cache {path} is not a valid .npy file ({e}); "
                             "delete it and it is rebuilt") from None
        if dtype.hasobject or dtype.kind not in "iu":
            raise ValueError(f"dataset index cache {path} holds {dtype} data, not an integer "
                             "index; refusing to load it (object arrays run code when read, "
                             "floats would index samples wrongly). Delete it and it is rebuilt")
        needed = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if repair and os.path.getsize(path) < needed:
            remove_cache_set(path, f"is cut short ({os.path.getsize(path)} of {needed} bytes)")


def blend_problem(dataset_index, dataset_sample_index, sizes) -> Optional[str]:
    """What is implausible about a blend's indices (None: nothing): every entry names one of
    its datasets and a sample that dataset has."""
    which = np.asarray(dataset_index).astype(np.int64)
    sample = np.asarray(dataset_sample_index).astype(np.int64)
    if which.ndim != 1 or sample.shape != which.shape:
        return "has indices of the wrong shape"
    if len(which) and (which.min() < 0 or which.max() >= len(sizes)):
        return "names a dataset the blend does not have"
    if len(which) and (sample.min() < 0 or np.any(sample >= np.asarray(sizes)[which])):
        return "names a sample beyond the end of its dataset"
    return None


def index_problem(document_index, sample_index, shuffle_index, split_documents,
                  lengths, seq_length: int) -> Optional[str]:
    """What is implausible about one GPTDataset's indices (None: nothing)."""
    doc = np.asarray(document_index)
    samples = np.asarray(sample_index)
    shuffle = np.asarray(shuffle_index)
    docs = np.asarray(split_documents)
    if doc.ndim != 1 or samples.ndim != 2 or samples.shape[1:] != (2,) or shuffle.ndim != 1:
        return "has indices of the wrong shape"
    n = len(samples) - 1
    seen = np.zeros(max(n, 0), dtype=bool)
    if len(shuffle) != n or (n and (shuffle.min() < 0 or shuffle.max() >= n)):
        return "has a shuffle index that is not a permutation of its samples"
    seen[shuffle] = True
    if not seen.all():
        return "has a shuffle index that is not a permutation of its samples"
    if not len(doc) or doc.min() < 0 or doc.max() >= len(lengths):
        return "has a document index outside the dataset"
    counts = np.bincount(doc, minlength=len(lengths))
    if counts[docs].min() == 0 or counts[docs].min() != counts[docs].max() \
            or counts.sum() != counts[docs].sum():
        return "has a document index that does not hold every document of its split equally often"
    rows, offsets = samples[:, 0].astype(np.int64), samples[:, 1].astype(np.int64)
    if rows.min() < 0 or rows.max() >= len(doc):
        return "has a sample index outside its document index"
    starts = np.concatenate([[0], np.cumsum(np.asarray(lengths)[doc], dtype=np.int64)])
    position = starts[rows] + offsets
    if position[0] != 0 or np.any(np.diff(position) != seq_length):
        return f"has sample boundaries that are not {seq_length} tokens apart"
    return None
