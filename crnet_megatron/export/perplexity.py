"""``crnet-eval CHECKPOINT --data FILE.jsonl|FILE.txt|PREFIX``: perplexity on any text.

Tokenizes with the checkpoint's own tokenizer (EOD after each document), takes the first
``--tokens`` predicted tokens as non-overlapping windows of the model's sequence length (window i
covers stream tokens [i s, (i + 1) s], every token predicted from its window's prefix), and
runs the same forward-only Megatron schedule as training-time eval. Prints and writes JSON.
"""

from __future__ import annotations

import hashlib
import math


def evaluate(checkpoint: str, data: str, tokens: int = 65536, json_key: str = "text",
             seq_length: int = 0, tokenizer: str = None) -> dict:
    from crnet_megatron.data.token_windows import TokenWindows, token_stream
    from crnet_megatron.export.loader import load_megatron_model, single_process
    from crnet_megatron.training.data import SampleIterator
    from crnet_megatron.training.step import mean_loss

    with single_process():
        model, loaded = load_megatron_model(checkpoint, tokenizer)
        seq = seq_length or loaded.cfg["model"]["seq_length"]
        if seq > loaded.cfg["model"]["seq_length"]:
            raise ValueError(f"--seq-length {seq} is longer than the model's sequence length "
                             f"{loaded.cfg['model']['seq_length']}")
        stream = token_stream(data, loaded.tokenizer, json_key, limit=tokens + 1)
        windows = min(tokens, len(stream) - 1) // seq
        if windows < 1:
            raise ValueError(f"--data {data} has {len(stream)} tokens, fewer than one window "
                             f"of {seq + 1}")
        device = next(model.parameters()).device
        it = SampleIterator(TokenWindows(stream, seq, windows), 1, 0, 1, 0, device,
                            loaded.tokenizer.vocab_size, [data])
        loss = mean_loss(model, it, windows, 1, seq, 1)
    digest = hashlib.sha256(stream[:windows * seq + 1].tobytes()).hexdigest()
    return dict(checkpoint=loaded.common["path"], iteration=loaded.common.get("iteration"),
                variant=loaded.cfg["model"]["variant"], data=data,
                tokens_sha256=digest, tokens=windows * seq, windows=windows, seq_length=seq,
                window_stride=seq, loss=loss, ppl=math.exp(min(loss, 50)))
