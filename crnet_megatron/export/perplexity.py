"""Perplexity of a checkpoint or an export on any text (``crnet-eval``).

Tokenizes with the checkpoint's own tokenizer (EOD after each document), takes the first
``--tokens`` predicted tokens as non-overlapping windows of the model's sequence length (window i
covers stream tokens [i s, (i + 1) s], every token predicted from its window's prefix), and
runs the same forward-only Megatron schedule as training-time eval; an export directory is scored
on its ``CRNetForCausalLM`` over the same windows (token-mean cross entropy).
"""

from __future__ import annotations

import hashlib
import math
import os


def evaluate(checkpoint: str, data: str, tokens: int = 65536, json_key: str = "text",
             seq_length: int = 0, tokenizer: str = None) -> dict:
    """Perplexity of a run directory, an ``iter_N`` checkpoint or an export directory."""
    if os.path.isfile(os.path.join(checkpoint, "config.json")):
        return _evaluate_export(checkpoint, data, tokens, json_key, seq_length, tokenizer)
    from crnet_megatron.data.batches import SampleIterator
    from crnet_megatron.data.token_windows import TokenWindows, token_stream
    from crnet_megatron.export.loader import load_megatron_model, single_process
    from crnet_megatron.parallel.schedule import mean_loss

    with single_process():
        model, loaded = load_megatron_model(checkpoint, tokenizer)
        seq = _seq(seq_length, loaded.cfg["model"]["seq_length"])
        stream = token_stream(data, loaded.tokenizer, json_key, limit=tokens + 1)
        windows = _windows(stream, seq, tokens, data)
        device = next(model.parameters()).device
        it = SampleIterator(TokenWindows(stream, seq, windows), 1, 0, 1, 0, device,
                            loaded.tokenizer.vocab_size, [data])
        loss = mean_loss(model, it, windows, 1, seq, 1)
    return _result(loaded.common["path"], loaded.common.get("iteration"),
                   loaded.cfg["model"]["variant"], data, stream, windows, seq, loss)


def _evaluate_export(path, data, tokens, json_key, seq_length, tokenizer) -> dict:
    """The same windows and token-mean loss, on the export's ``CRNetForCausalLM``."""

    import torch
    import torch.nn.functional as F

    from crnet_megatron.data.preprocess import HFTokenizer
    from crnet_megatron.data.token_windows import TokenWindows, token_stream
    from crnet_megatron.export.generation import load_for_generation
    from crnet_megatron.export.modeling_crnet import read_export_config

    model, tok, eos = load_for_generation(path, tokenizer)
    config = read_export_config(path)
    hf_tok = HFTokenizer(tokenizer or os.path.join(path, "tokenizer.json"), tok.id_to_token(eos))
    seq = _seq(seq_length, config["max_position_embeddings"])
    stream = token_stream(data, hf_tok, json_key, limit=tokens + 1)
    windows = _windows(stream, seq, tokens, data)
    losses = []
    with torch.no_grad():
        dataset = TokenWindows(stream, seq, windows)
        for i in range(windows):
            w = dataset[i]
            logits = model(w["tokens"][None]).logits.float()
            losses.append(F.cross_entropy(logits[0], w["labels"]).item())
    return _result(os.path.abspath(path), None, config.get("crnet_projection", "dense"), data,
                   stream, windows, seq, sum(losses) / len(losses))


def _seq(asked: int, model_seq: int) -> int:
    if asked > model_seq:
        raise ValueError(f"--seq-length {asked} is longer than the model's sequence length "
                         f"{model_seq}")
    return asked or model_seq


def _windows(stream, seq: int, tokens: int, data: str) -> int:
    windows = min(tokens, len(stream) - 1) // seq
    if windows < 1:
        raise ValueError(f"--data {data} has {len(stream)} tokens, fewer than one window of "
                         f"{seq + 1}")
    return windows


def _result(source, iteration, variant, data, stream, windows, seq, loss) -> dict:
    digest = hashlib.sha256(stream[:windows * seq + 1].tobytes()).hexdigest()
    return dict(checkpoint=source, iteration=iteration, variant=variant, data=data,
                tokens_sha256=digest, tokens=windows * seq, windows=windows, seq_length=seq,
                window_stride=seq, loss=loss, ppl=math.exp(min(loss, 50)))
