"""Preprocess jsonl into Megatron indexed datasets with an HF tokenizer.

    # train a BPE tokenizer on the input, then tokenize it
    crnet-preprocess --input data.jsonl --output-prefix data/my \\
        --vocab-size 32000 --tokenizer-out data/tokenizer.json --append-eod --workers 4
    # or use any tokenizer.json
    crnet-preprocess --input data.jsonl --output-prefix data/my \\
        --tokenizer data/tokenizer.json --append-eod

Writes ``PREFIX_{key}_document.bin/.idx`` for each ``--json-keys`` field.
"""

from __future__ import annotations

import argparse
import os
import sys

from crnet_megatron.data.corpus import train_tokenizer
from crnet_megatron.data.preprocess import iter_texts, preprocess_jsonl


def main(argv=None):
    p = argparse.ArgumentParser(prog="crnet-preprocess", description=__doc__.splitlines()[0])
    p.add_argument("--input", nargs="+", required=True, help="jsonl file(s)")
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--json-keys", nargs="+", default=["text"])
    p.add_argument("--tokenizer", help="an HF tokenizer.json")
    p.add_argument("--vocab-size", type=int, help="train a byte-level BPE of this size instead")
    p.add_argument("--tokenizer-out", help="where to save the trained tokenizer")
    p.add_argument("--eod-token", help="name of the end-of-document token")
    p.add_argument("--append-eod", action="store_true")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    try:
        run(p, args)
    except (ValueError, OSError) as e:
        print(f"crnet-preprocess: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def run(p, args):
    from crnet_megatron.data.preprocess import output_paths
    from crnet_megatron.parallel.environment import announce

    if bool(args.tokenizer) == bool(args.vocab_size):
        p.error("give exactly one of --tokenizer or --vocab-size")
    if args.vocab_size and not args.tokenizer_out:
        p.error("--vocab-size needs --tokenizer-out")
    for path in args.input:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"input file {path!r} does not exist")
    # every output is checked before anything is trained or written
    outputs = [f for key in args.json_keys for f in output_paths(args.output_prefix, key)]
    if args.vocab_size:
        outputs.append(args.tokenizer_out)
    existing = [f for f in outputs if os.path.exists(f)]
    if existing and not args.overwrite:
        raise FileExistsError(f"{', '.join(existing)} exist; nothing was written (pass "
                              "--overwrite to replace them)")
    for path in outputs:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    announce(sys.stdout)
    tokenizer = args.tokenizer
    if args.vocab_size:
        docs = list(iter_texts(args.input, args.json_keys[0]))
        if not docs:
            raise ValueError(f"no documents with field {args.json_keys[0]!r} in {args.input}: "
                             "nothing to train a tokenizer on; nothing was written")
        try:
            train_tokenizer(docs, args.vocab_size).save(args.tokenizer_out)
        except Exception as e:  # noqa: BLE001 - tokenizers raises bare Exceptions
            raise ValueError(f"--tokenizer-out {args.tokenizer_out}: the tokenizer could not be "
                             f"trained or saved ({str(e).splitlines()[0][:200]})") from None
        tokenizer = args.tokenizer_out
    try:
        preprocess_jsonl(args.input, args.output_prefix, tokenizer, args.json_keys,
                         args.append_eod, args.workers, args.eod_token, args.overwrite)
    except BaseException:
        if args.vocab_size and os.path.isfile(args.tokenizer_out):
            os.remove(args.tokenizer_out)  # trained for this run alone: nothing left behind
        raise


if __name__ == "__main__":
    main()
