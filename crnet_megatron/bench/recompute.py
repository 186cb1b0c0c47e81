"""Recompute benchmark: saved-activation bytes, recompute FLOPs and step time, side by side in
one run, for no recompute, Megatron ``full`` (uniform, 1 layer), Megatron ``selective``
(core_attn) and CR-Net Algorithm 1 on the same CR-Net model and data. Bytes are what autograd
saves during the decoder's forward (``saved_tensors_hooks``, de-duplicated by storage); FLOPs are
the counting module's analytic recompute FLOPs. Prints a table (ratios vs ``full``), the
analytic numbers for LLaMA-2 7B at r = 512, and writes JSON.

    crnet-bench recompute --json bench_recompute.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

MODES = {
    "none": dict(),
    "full": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    "selective": dict(recompute_granularity="selective", recompute_modules=["core_attn"]),
    "crnet": dict(recompute_granularity="crnet"),
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--ffn", type=int, default=1376)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--rank", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--every", type=int, default=8)
    p.add_argument("--steps", type=int, default=5,
                   help="timed training steps per mode; 0 measures bytes only (large shapes)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--json")
    args = p.parse_args(argv)

    import torch

    from crnet_megatron import CRNetConfig, build_model
    from crnet_megatron.analysis.counting import (
        LLAMA_SHAPES,
        ModelShape,
        recompute_flops,
        recompute_saved_elements,
    )
    from crnet_megatron.parallel.groups import destroy_distributed, init_distributed
    from crnet_megatron.testing.profiling import saved_activation_bytes

    os.environ.setdefault("MASTER_PORT", "29517")
    init_distributed(1, 1, seed=1)
    vocab = 2048
    rows, weights = [], None
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (args.batch, args.seq_len), generator=g)
    pos = torch.arange(args.seq_len)[None].expand(args.batch, -1)
    for mode in ["full"] + [m for m in args.modes if m != "full"]:
        extra = MODES[mode]
        config = CRNetConfig(num_layers=args.layers, hidden_size=args.hidden,
                             ffn_hidden_size=args.ffn, num_attention_heads=args.heads,
                             crnet_rank=args.rank, crnet_checkpoint_every=args.every,
                             use_cpu_initialization=True, **extra)
        model = build_model(config, vocab_size=vocab, max_sequence_length=args.seq_len)
        if args.steps:  # same weights in every mode for the timed steps
            if weights is None:
                weights = {n: t.detach().clone() for n, t in model.named_parameters()}
            with torch.no_grad():
                for n, t in model.named_parameters():
                    t.copy_(weights[n])
        h = model.embedding(ids, pos).detach().requires_grad_(True)
        rope = model.rotary_pos_emb(args.seq_len)
        nbytes, out = saved_activation_bytes(
            lambda: model.decoder(h, None, rotary_pos_emb=rope))
        del out
        times = []
        for _ in range(args.steps):
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            model(ids, pos, None, labels=ids).mean().backward()
            times.append(time.perf_counter() - t0)
        shape = ModelShape.from_config(config, vocab)
        flops = 0 if mode == "none" else recompute_flops(
            shape, config.crnet_layer_ranks, mode, args.seq_len, args.every)
        rows.append(dict(mode=mode, saved_bytes=nbytes, recompute_flops_per_token=flops,
                         step_time_s=statistics.median(times) if times else float("nan")))
        del model
    destroy_distributed()

    full = next(r for r in rows if r["mode"] == "full")
    print(f"model: h={args.hidden} h_ff={args.ffn} L={args.layers} r={args.rank} "
          f"seq={args.seq_len} batch={args.batch} every={args.every} (fp32, CPU)")
    print(f"{'mode':>10} {'saved MiB':>10} {'vs full':>8} {'recomp MFLOP/tok':>17} "
          f"{'vs full':>8} {'step s':>8} {'vs full':>8}")
    for r in rows:
        r["saved_ratio"] = r["saved_bytes"] / full["saved_bytes"]
        r["flops_ratio"] = r["recompute_flops_per_token"] / full["recompute_flops_per_token"]
        r["step_ratio"] = r["step_time_s"] / full["step_time_s"]
        print(f"{r['mode']:>10} {r['saved_bytes'] / 2**20:>10.2f} {r['saved_ratio']:>8.3f} "
              f"{r['recompute_flops_per_token'] / 1e6:>17.2f} {r['flops_ratio']:>8.3f} "
              f"{r['step_time_s']:>8.3f} {r['step_ratio']:>8.3f}")
    s7 = LLAMA_SHAPES["7b"]
    analytic = {}
    for mode in ("full", "crnet"):
        analytic[mode] = dict(saved_elements_per_token=recompute_saved_elements(s7, 512, mode),
                              recompute_flops_per_token=recompute_flops(s7, 512, mode, 1024))
    mem = analytic["crnet"]["saved_elements_per_token"] / analytic["full"]["saved_elements_per_token"]
    fl = analytic["crnet"]["recompute_flops_per_token"] / analytic["full"]["recompute_flops_per_token"]
    print(f"analytic LLaMA-2 7B, r=512, seq 1024: saved elements/token full "
          f"{analytic['full']['saved_elements_per_token']:,} vs crnet "
          f"{analytic['crnet']['saved_elements_per_token']:,} ({mem:.3f}x); recompute FLOPs "
          f"{fl:.3f}x of full")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(rows=rows, analytic_7b_r512=analytic,
                                                   args=vars(args)), indent=2))


if __name__ == "__main__":
    main()
