"""``crnet-eval CHECKPOINT --data FILE.jsonl|FILE.txt|PREFIX``: perplexity on any text.

Tokenizes with the checkpoint's own tokenizer (EOD after each document), takes the first
``--tokens`` predicted tokens as non-overlapping windows of the model's sequence length (window i
covers stream tokens [i s, (i + 1) s], every token predicted from its window's prefix), and
runs the same forward-only Megatron schedule as training-time eval. Prints and writes JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys

from .cli import run_cli


def evaluate(checkpoint: str, data: str, tokens: int = 65536, json_key: str = "text",
             seq_length: int = 0, tokenizer: str = None) -> dict:
    from .inference import load_megatron_model, single_process
    from .training.data import SampleIterator
    from .training.evaluation import TokenWindows, mean_loss, token_stream

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
                projection=loaded.cfg["model"]["projection"], data=data,
                tokens_sha256=digest, tokens=windows * seq, windows=windows, seq_length=seq,
                window_stride=seq, loss=loss, ppl=math.exp(min(loss, 50)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="crnet-eval", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="run directory (latest checkpoint) or iter_N directory")
    p.add_argument("--data", required=True, help=".jsonl, text file, or indexed-dataset prefix")
    p.add_argument("--tokens", type=int, default=65536, help="predicted tokens to score")
    p.add_argument("--seq-length", type=int, default=0, help="window length (default: the model's)")
    p.add_argument("--json-key", default="text")
    p.add_argument("--tokenizer")
    p.add_argument("--output", help="write the JSON result here too")
    args = p.parse_args(argv)
    return run_cli("crnet-eval", lambda: _main(args))


def _main(args) -> int:
    if args.tokens < 1 or args.seq_length < 0:
        raise ValueError("--tokens must be >= 1 and --seq-length >= 0")
    result = evaluate(args.checkpoint, args.data, args.tokens, args.json_key, args.seq_length,
                      args.tokenizer)
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
