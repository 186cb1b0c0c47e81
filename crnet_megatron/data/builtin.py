"""Token stream of the built-in corpus, cached on disk, and random training windows from it."""

from __future__ import annotations

import os
import sys

import numpy as np
import torch

from .corpus import EOS, builtin_corpus, load_or_train_tokenizer


def builtin_tokens(vocab_size: int, cache_dir: str) -> np.ndarray:
    """All documents tokenized and joined with EOS (uint16/int32), cached per vocab size."""
    tag = f"py{sys.version_info.major}{sys.version_info.minor}_v{vocab_size}"
    path = os.path.join(os.path.expanduser(cache_dir), f"builtin_tokens_{tag}.npy")
    if os.path.exists(path):
        return np.load(path)
    docs = builtin_corpus()
    tok = load_or_train_tokenizer(docs, vocab_size, os.path.dirname(path))
    eos = tok.token_to_id(EOS)
    ids = []
    for enc in tok.encode_batch(docs):
        ids.extend(enc.ids)
        ids.append(eos)
    arr = np.asarray(ids, dtype=np.uint16 if vocab_size < 65536 else np.int32)
    tmp = path + f".tmp{os.getpid()}.npy"
    np.save(tmp, arr)
    os.replace(tmp, path)
    return arr


class WindowSampler:
    """Random (seq_len + 1)-token windows; the last ``holdout`` fraction is kept for evaluation.

    Every TP/PP rank of one data-parallel replica draws the same windows (same seed); DP
    replicas are offset by their DP rank.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int, dp_rank: int = 0,
                 holdout: float = 0.05):
        split = int(len(tokens) * (1 - holdout))
        if split <= seq_len + 1:
            raise ValueError(f"corpus of {len(tokens)} tokens is too small for seq_len={seq_len}")
        self.train = torch.from_numpy(tokens[:split].astype(np.int64))
        self.valid = torch.from_numpy(tokens[split:].astype(np.int64))
        self.seq_len = seq_len
        self.gen = torch.Generator().manual_seed(seed + 1000 * dp_rank)

    def _windows(self, data, starts):
        idx = starts[:, None] + torch.arange(self.seq_len + 1)[None]
        w = data[idx]
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()

    def next_batch(self, batch_size: int):
        starts = torch.randint(0, len(self.train) - self.seq_len - 1, (batch_size,),
                               generator=self.gen)
        return self._windows(self.train, starts)

    def eval_batches(self, batch_size: int, count: int):
        """Fixed, non-overlapping held-out windows (the same before and after training)."""
        n = min(count * batch_size, (len(self.valid) - 1) // (self.seq_len + 1))
        if n < 1:
            raise ValueError("held-out split too small for one evaluation window")
        starts = torch.arange(n) * (self.seq_len + 1)
        return [self._windows(self.valid, starts[i:i + batch_size])
                for i in range(0, n, batch_size)]
