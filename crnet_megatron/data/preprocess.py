"""jsonl -> Megatron indexed dataset (``PREFIX_{key}_document.bin/.idx``) with an HF tokenizer.

Megatron-LM's ``tools/preprocess_data.py`` layout and naming; Megatron-Core's
``IndexedDatasetBuilder`` writes the files. Tokenization runs in ``workers`` processes. Outputs
are written under temporary names and renamed when complete; existing outputs are never
overwritten unless asked.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing as mp
import os
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tokenizers import Tokenizer
from tqdm import tqdm

from crnet_megatron.data.safe_files import (
    check_readable,
    claim,
    remove_stale_temporaries,
    replace_into,
    temporary_path,
)
from crnet_megatron.data.validate import tokenizer_file

EOD_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|eos|>")


def open_tokenizer(path: str) -> Tokenizer:
    """A checked ``tokenizer.json`` (``validate.tokenizer_file``) as an HF ``Tokenizer``; what
    the library refuses is one ValueError naming the file."""
    path = tokenizer_file(path)
    try:
        return Tokenizer.from_file(path)
    except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception
        raise ValueError(f"tokenizer file {path!r} is not a valid HF tokenizers JSON "
                         f"({str(e).splitlines()[0][:200]})") from None


class HFTokenizer:
    """An HF ``tokenizers`` tokenizer with the attributes Megatron's GPTDataset reads."""

    def __init__(self, path: str, eod_token: Optional[str] = None):
        self.path = path = tokenizer_file(path)
        self.tok = open_tokenizer(path)
        names = (eod_token,) if eod_token else EOD_NAMES
        ids = [self.tok.token_to_id(n) for n in names]
        found = [i for i in ids if i is not None]
        if not found:
            raise ValueError(f"tokenizer {path!r} has no end-of-document token among "
                             f"{list(names)}; name it with data.eod_token (--eod-token)")
        self.eod = self.pad = found[0]
        self.vocab_size = self.tok.get_vocab_size()
        self.unique_identifiers = {"class": "HFTokenizer", "path": os.path.abspath(path)}

    def fingerprint(self) -> dict:
        """What a checkpoint must agree on: vocabulary size and a hash of the tokenizer."""
        digest = hashlib.sha256(self.tok.to_str().encode("utf-8")).hexdigest()
        return {"vocab_size": self.vocab_size, "sha256": digest}

    def tokenize(self, text: str) -> List[int]:
        return self.tok.encode(text).ids

    def detokenize(self, ids) -> str:
        return self.tok.decode(list(ids))


def output_paths(prefix: str, key: str) -> Tuple[str, str]:
    base = f"{prefix}_{key}_document"
    return base + ".bin", base + ".idx"


_WORKER_TOK: Optional[HFTokenizer] = None


def _init_worker(path: str, eod_token: Optional[str]):
    global _WORKER_TOK
    _WORKER_TOK = HFTokenizer(path, eod_token)


def _encode(item: Tuple[int, str, str, bool]) -> List[int]:
    where, line, key, append_eod = item
    path, _, n = where.rpartition(":")
    ids = _WORKER_TOK.tokenize(_field(json_line(path, int(n), line), key, where))
    if append_eod:
        ids.append(_WORKER_TOK.eod)
    return ids


MAX_LINE_BYTES = 16 << 20  # one document; a longer line is refused before it is tokenized


def read_lines(path: str) -> Iterator[Tuple[int, str]]:
    """(line number, line) of a UTF-8 text file; bad bytes or a line over ``MAX_LINE_BYTES``
    are an error naming file and line (read in bounded pieces, never a whole huge line)."""
    check_readable(path, "input file")
    with open(path, "rb") as f:
        for n in itertools.count(1):
            raw = f.readline(MAX_LINE_BYTES + 1)
            if not raw:
                return
            if len(raw) > MAX_LINE_BYTES:
                raise ValueError(f"{path}:{n}: a line longer than {MAX_LINE_BYTES} bytes; split "
                                 "such documents (nothing was written)")
            try:
                yield n, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{n}: not UTF-8 text ({e.reason} at byte "
                                 f"{e.start}); jsonl input must be UTF-8") from None


def iter_texts(paths: Sequence[str], key: str) -> Iterator[str]:
    """The ``key`` field of every document of jsonl files, with errors naming file and line."""
    for path in paths:
        for n, line in read_lines(path):
            if line.strip():
                yield _field(json_line(path, n, line), key, f"{path}:{n}")


def json_line(path: str, n: int, line: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise ValueError(f"{path}:{n}: JSON nested too deeply to be read") from None


def _field(doc, key: str, where: str) -> str:
    if not isinstance(doc, dict) or not isinstance(doc.get(key), str):
        raise ValueError(f"{where}: no string field {key!r}")
    return doc[key]


def _lines(paths: Sequence[str], key: str, append_eod: bool) -> Iterator[Tuple]:
    for path in paths:
        for n, line in read_lines(path):
            if line.strip():
                yield (f"{path}:{n}", line, key, append_eod)


def preprocess_jsonl(inputs: Sequence[str], output_prefix: str, tokenizer_path: str,
                     json_keys: Sequence[str] = ("text",), append_eod: bool = False,
                     workers: int = 1, eod_token: Optional[str] = None, overwrite: bool = False,
                     progress: bool = True) -> Dict[str, str]:
    """Tokenize jsonl files into one indexed dataset per json key; returns {key: prefix}."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    for path in inputs:
        if not os.path.exists(path):
            raise FileNotFoundError(f"input file {path!r} does not exist")
    tok = HFTokenizer(tokenizer_path, eod_token)
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    result = {}
    for key in json_keys:
        bin_path, idx_path = output_paths(output_prefix, key)
        if not overwrite and (os.path.exists(bin_path) or os.path.exists(idx_path)):
            raise FileExistsError(f"{bin_path} / {idx_path} exist; pass overwrite=True "
                                  "(--overwrite) to replace them")
        for path in (bin_path, idx_path):
            remove_stale_temporaries(path, "dataset")
        tmp_bin, tmp_idx = temporary_path(bin_path), temporary_path(idx_path)
        claim(tmp_bin), claim(tmp_idx)  # fresh names, created here: no planted link written
        builder = IndexedDatasetBuilder(tmp_bin, dtype=DType.optimal_dtype(tok.vocab_size))
        items = _lines(inputs, key, append_eod)
        docs = tokens = 0
        try:
            with mp.get_context("fork").Pool(workers, _init_worker, (tokenizer_path, eod_token)) \
                    if workers > 1 else _Serial(tokenizer_path, eod_token) as pool:
                for ids in tqdm(pool.imap(_encode, items, chunksize=32), disable=not progress,
                                desc=f"tokenize {key}", unit="doc"):
                    builder.add_document(torch.tensor(ids, dtype=torch.int64), [len(ids)])
                    docs += 1
                    tokens += len(ids)
            builder.finalize(tmp_idx)
        except BaseException:
            for p in (tmp_bin, tmp_idx):
                if os.path.exists(p):
                    os.remove(p)
            raise
        if docs == 0:
            os.remove(tmp_bin), os.remove(tmp_idx)
            raise ValueError(f"no documents with field {key!r} in {list(inputs)}")
        replace_into(tmp_bin, bin_path, "dataset file")
        replace_into(tmp_idx, idx_path, "dataset index")
        result[key] = bin_path[:-4]
        if progress:
            print(f"wrote {docs:,} documents, {tokens:,} tokens to {bin_path[:-4]}.{{bin,idx}}")
    return result


class _Serial:
    """In-process stand-in for a worker pool (workers=1)."""

    def __init__(self, path, eod_token):
        _init_worker(path, eod_token)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def imap(self, fn, items, chunksize=1):
        return map(fn, items)


def read_documents(prefix: str) -> List[np.ndarray]:
    """All documents of an indexed dataset (for checks and tests)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    return [np.array(ds[i], copy=True) for i in range(len(ds))]  # copies: ds unmaps on close
