"""``crnet-generate CHECKPOINT_OR_EXPORT --prompt TEXT``: sample from a trained model.

Greedy (``--temperature 0``), temperature, top-k and top-p sampling with a KV cache. A CR-Net
chain runs through depth per position, so a decode step needs only the new token's
previous-layer projection outputs: the cache holds keys and values, as in any LLaMA. Reads an
export directory (``crnet-export``) or a checkpoint (converted in memory); prints the
text and tokens/s.
"""

from __future__ import annotations

import argparse
import sys
import time

from crnet_megatron.cli.common import run_cli
from crnet_megatron.export.generation import generate, load_for_generation


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="crnet-generate", description=__doc__.splitlines()[0])
    p.add_argument("model", help="export directory, run directory or iter_N checkpoint")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence per token")
    args = p.parse_args(argv)
    return run_cli("crnet-generate", lambda: _main(args))


def _main(args) -> int:
    if not 0 < args.top_p <= 1 or args.top_k < 0 or args.temperature < 0:
        raise ValueError("--top-p must be in (0, 1], --top-k >= 0 and --temperature >= 0")
    model, tok, eos = load_for_generation(args.model, args.tokenizer)
    prompt = tok.encode(args.prompt).ids
    start = time.perf_counter()
    new = generate(model, prompt, args.max_new_tokens, args.temperature, args.top_k,
                   args.top_p, args.seed, eos, use_cache=not args.no_cache)
    dt = time.perf_counter() - start
    print(args.prompt + tok.decode(new))
    print(f"[{len(new)} tokens in {dt:.2f} s: {len(new) / max(dt, 1e-9):.1f} tokens/s, "
          f"{'no cache' if args.no_cache else 'KV cache'}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
