"""Recompute benchmark: saved-activation bytes, recompute FLOPs and step time, side by side in
one run, for no recompute, Megatron ``full`` (uniform, 1 layer), Megatron ``selective``
(core_attn) and CR-Net Algorithm 1 on the same CR-Net model and data. Bytes are what autograd
saves during the decoder's forward (``saved_tensors_hooks``, de-duplicated by storage); step
times are interleaved across the modes (same weights, same batch); FLOPs are
the counting module's analytic recompute FLOPs. Prints a table (ratios vs ``full``), the
analytic numbers for LLaMA-2 7B at r = 512, and writes JSON.

    crnet-bench recompute --json bench_recompute.json
"""

from __future__ import annotations

import warnings

from crnet_megatron.bench import runner

warnings.filterwarnings("ignore")

MODES = {
    "none": dict(),
    "full": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    "selective": dict(recompute_granularity="selective", recompute_modules=["core_attn"]),
    "crnet": dict(recompute_granularity="crnet"),
}


def main(argv=None):
    p = runner.parser(__doc__, "recompute", repeats=5, warmup=1)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--ffn", type=int, default=1376)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--rank", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--every", type=int, default=8)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    args = p.parse_args(argv)
    modes = ["full"] + [m for m in args.modes if m != "full"]
    with runner.one_process():
        rows, times = _measure(args, modes)
    for r in rows:
        r.update(runner.timing_rows(times, "full")[modes.index(r["mode"])] if times else {})
    full = rows[0]
    for r in rows:
        r["saved_ratio"] = r["saved_bytes"] / full["saved_bytes"]
        r["flops_ratio"] = r["recompute_flops_per_token"] / full["recompute_flops_per_token"]
        r["saved_mib"] = r["saved_bytes"] / 2**20
        r["recompute_mflop_per_token"] = r["recompute_flops_per_token"] / 1e6
    title = (f"h={args.hidden} h_ff={args.ffn} L={args.layers} r={args.rank} seq={args.seq_len} "
             f"batch={args.batch} every={args.every} (fp32, CPU); step times: {args.repeats} "
             f"repeats after {args.warmup} warm-up, interleaved; ratios vs full")
    columns = [("mode", "mode", ""), ("saved MiB", "saved_mib", ".2f"),
               ("vs full", "saved_ratio", ".3f"),
               ("recompute MFLOP/token", "recompute_mflop_per_token", ".2f"),
               ("vs full", "flops_ratio", ".3f"), ("step min ms", "min_ms", ".1f"),
               ("step median ms", "median_ms", ".1f"), ("vs full", "ratio", ".3f")]
    analytic = _analytic_7b()
    runner.finish(args, [runner.table(rows, columns, title), analytic["text"]], rows=rows,
                  analytic_7b_r512=analytic["numbers"], args=vars(args))


def _measure(args, modes):
    """Saved bytes and analytic recompute FLOPs per mode, and interleaved step times (every
    mode's model holds the same weights; ``--repeats 0`` measures bytes only)."""
    import torch

    from crnet_megatron import CRNetConfig, build_model
    from crnet_megatron.analysis.counting import ModelShape, recompute_flops
    from crnet_megatron.diagnostics.profiling import saved_activation_bytes

    vocab = 2048
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (args.batch, args.seq_len), generator=g)
    pos = torch.arange(args.seq_len)[None].expand(args.batch, -1)
    rows, steps, weights = [], {}, None
    for mode in modes:
        config = CRNetConfig(num_layers=args.layers, hidden_size=args.hidden,
                             ffn_hidden_size=args.ffn, num_attention_heads=args.heads,
                             crnet_rank=args.rank, crnet_checkpoint_every=args.every,
                             use_cpu_initialization=True, **MODES[mode])
        model = build_model(config, vocab_size=vocab, max_sequence_length=args.seq_len, seed=1)
        weights = weights or {n: t.detach().clone() for n, t in model.named_parameters()}
        with torch.no_grad():
            for n, t in model.named_parameters():
                t.copy_(weights[n])
        h = model.embedding(ids, pos).detach().requires_grad_(True)
        rope = model.rotary_pos_emb(args.seq_len)
        nbytes, _ = saved_activation_bytes(
            lambda m=model: m.decoder(h, None, rotary_pos_emb=rope))
        shape = ModelShape.from_config(config, vocab)
        flops = 0 if mode == "none" else recompute_flops(
            shape, config.crnet_layer_ranks, mode, args.seq_len, args.every)
        rows.append(dict(mode=mode, saved_bytes=nbytes, recompute_flops_per_token=flops))

        def step(m=model):
            m.zero_grad(set_to_none=True)
            m(ids, pos, None, labels=ids).mean().backward()
        steps[mode] = step
    times = runner.interleaved(steps, args.warmup, args.repeats) if args.repeats else {}
    return rows, times


def _analytic_7b():
    from crnet_megatron.analysis.counting import (
        LLAMA_SHAPES,
        recompute_flops,
        recompute_saved_elements,
    )

    s7 = LLAMA_SHAPES["7b"]
    numbers = {mode: dict(saved_elements_per_token=recompute_saved_elements(s7, 512, mode),
                          recompute_flops_per_token=recompute_flops(s7, 512, mode, 1024))
               for mode in ("full", "crnet")}
    full, cr = numbers["full"], numbers["crnet"]
    mem = cr["saved_elements_per_token"] / full["saved_elements_per_token"]
    fl = cr["recompute_flops_per_token"] / full["recompute_flops_per_token"]
    text = (f"analytic LLaMA-2 7B, r=512, seq 1024: saved elements/token full "
            f"{full['saved_elements_per_token']:,} vs crnet {cr['saved_elements_per_token']:,} "
            f"({mem:.3f}x); recompute FLOPs {fl:.3f}x of full")
    return dict(numbers=numbers, text=text)


if __name__ == "__main__":
    main()
