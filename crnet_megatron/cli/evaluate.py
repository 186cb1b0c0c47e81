"""``crnet-eval CHECKPOINT_OR_EXPORT --data FILE.jsonl|FILE.txt|PREFIX``: perplexity on any text.

Tokenizes with the checkpoint's own tokenizer (EOD after each document), takes the first
``--tokens`` predicted tokens as non-overlapping windows of the model's sequence length (window i
covers stream tokens [i s, (i + 1) s], every token predicted from its window's prefix), and
runs the same forward-only Megatron schedule as training-time eval. Prints and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys

from crnet_megatron.cli.common import run_cli
from crnet_megatron.export.perplexity import evaluate


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="crnet-eval", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="run directory (latest checkpoint), iter_N directory or "
                   "export directory (crnet-export)")
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
