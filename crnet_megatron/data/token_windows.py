"""Evaluation text as token windows: a token stream from a .jsonl / text file or an indexed
dataset prefix, cut into non-overlapping windows in the sample format of Megatron's GPTDataset
(``crnet-eval``, the rank advisor)."""

from __future__ import annotations

from typing import Dict, List

import numpy as np
import torch


class TokenWindows:
    """Non-overlapping windows of ``seq_len + 1`` tokens of one token stream (window i starts
    at token i * seq_len), in the sample format of Megatron's GPTDataset."""

    def __init__(self, tokens: np.ndarray, seq_len: int, num_windows: int):
        self.tokens, self.seq_len, self.n = tokens, seq_len, num_windows

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        w = torch.as_tensor(self.tokens[i * self.seq_len:(i + 1) * self.seq_len + 1],
                            dtype=torch.long)
        return dict(tokens=w[:-1], labels=w[1:], loss_mask=torch.ones(self.seq_len),
                    position_ids=torch.arange(self.seq_len))


def token_stream(path: str, tokenizer, json_key: str = "text",
                 limit: int = 0) -> np.ndarray:
    """Documents of a .jsonl / .txt file (tokenized, EOD after each) or of a Megatron indexed
    dataset prefix (as stored), concatenated; at most ``limit`` tokens (0 = all)."""
    import os

    from crnet_megatron.data.preprocess import iter_texts, read_lines

    parts: List[np.ndarray] = []
    total = 0
    if os.path.exists(path + ".idx") and os.path.exists(path + ".bin"):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        from crnet_megatron.data.validate import validate_prefix

        validate_prefix(path, tokenizer.vocab_size)
        ds = IndexedDataset(path)
        docs = (np.array(ds[i], copy=True) for i in range(len(ds)))
    elif path.endswith(".jsonl"):
        docs = (np.array(tokenizer.tokenize(t) + [tokenizer.eod]) for t in iter_texts([path], json_key))
    elif os.path.isfile(path):
        text = "".join(line for _, line in read_lines(path))
        docs = iter([np.array(tokenizer.tokenize(text) + [tokenizer.eod])])
    else:
        raise FileNotFoundError(f"--data {path}: not a .jsonl or text file, nor an indexed "
                                "dataset prefix (PREFIX.bin + PREFIX.idx)")
    for doc in docs:
        parts.append(doc.astype(np.int64))
        total += len(doc)
        if limit and total >= limit:
            break
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
