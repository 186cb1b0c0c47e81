"""Export a checkpoint (any TP/PP layout) to a self-contained HF-style directory.

    crnet-export runs/tiny_cpu exports/tiny_cpu [--dtype bfloat16] [--max-shard-size 5GB]
                 [--no-verify] [--device cpu]

Writes the weights (model.safetensors, or model-0000K-of-0000N.safetensors shards and
model.safetensors.index.json when they exceed --max-shard-size), config.json, tokenizer.json
(+ tokenizer_config.json) and, for CR-Net/lowrank, modeling_crnet.py. The checkpoint is read on
the CPU (--device cuda to use a GPU), checking only the model tensors' checksums; the shards are
written one tensor at a time. By default the export's logits on one sequence are computed from
its files one layer at a time and compared with the Megatron model's (max abs diff printed).
"""

import argparse
import sys

from crnet_megatron.cli.common import run_cli


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="crnet-export", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="run directory (latest checkpoint) or iter_N directory")
    p.add_argument("out", help="new (or empty) export directory")
    p.add_argument("--tokenizer", help="tokenizer.json, if not with the run")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--max-shard-size", default="5GB",
                   help="largest weights file (transformers' convention: 5GB, 500MB, 2GiB)")
    p.add_argument("--no-verify", action="store_true")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where the Megatron model is loaded")
    args = p.parse_args(argv)
    return run_cli("crnet-export", lambda: _export(args))


def _export(args) -> int:
    import torch

    from crnet_megatron.export.hf import check_output_dir, export
    from crnet_megatron.export.loader import (
        load_megatron_model,
        megatron_logits,
        single_process,
    )
    from crnet_megatron.export.shards import parse_size
    from crnet_megatron.export.verify import export_logits

    check_output_dir(args.out)
    parse_size(args.max_shard_size)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    with single_process():
        model, loaded = load_megatron_model(args.checkpoint, args.tokenizer, device=args.device)
        config = export(model, loaded, args.out, dtype, args.max_shard_size)
        print(f"exported {loaded.common['path']} ({config['architectures'][0]}, "
              f"{config.get('crnet_projection', 'dense')}) to {args.out}")
        if not args.no_verify:
            ids = torch.arange(min(32, loaded.cfg["model"]["seq_length"]))[None] % config["vocab_size"]
            ref = megatron_logits(model, ids)[..., :config["vocab_size"]].float()
            del model  # the export's side is computed next, one layer at a time, in its place
            got = export_logits(args.out, ids)
            diff = (got - ref.to(got)).abs().max().item()
            print(f"verify: max |logits(export) - logits(Megatron)| = {diff:.3e} on "
                  f"{ids.shape[1]} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
