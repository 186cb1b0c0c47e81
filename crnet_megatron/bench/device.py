"""bf16 training throughput and peak memory of CR-Net vs lowrank vs dense, side by side.

    crnet-bench device --json device.json          # GPU: LLaMA 1B and 7B layer shapes, seq 4096
    crnet-bench device --reduced                   # tiny shapes (CPU; the test suite)

For each shape, a few decoder layers of the real model (embedding, output layer and loss
included) train with AdamW in bf16, micro-batch 1: CR-Net without recompute and with Algorithm
1, lowrank and dense. Step times are interleaved across the variants after warm-up (min and
median of the repeats); tokens/s, model TFLOP/s and MFU come from CR-Net's FLOP count, peak
memory from one step of each variant alone. The device kit (``tools/device_kit.sh``) runs this
after the self-test.
"""

from __future__ import annotations

import warnings

from crnet_megatron.bench import runner
from crnet_megatron.config.tiny import TINY_FFN, TINY_HEADS, TINY_HIDDEN, TINY_VOCAB

warnings.filterwarnings("ignore")

# name -> (LLaMA shape, layers kept, rank, seq)
FULL = {"1b": ("1b", 4, 448, 4096), "7b": ("7b", 3, 512, 4096)}
REDUCED = {"tiny": (None, 3, 16, 64)}
VARIANTS = {"crnet": dict(crnet_variant="crnet"),
            "crnet+alg1": dict(crnet_variant="crnet", recompute_granularity="crnet",
                               crnet_checkpoint_every=2),
            "lowrank": dict(crnet_variant="lowrank"), "dense": dict(crnet_variant="dense")}


def _shape(name, layers):
    from dataclasses import replace

    from crnet_megatron.analysis.counting import LLAMA_SHAPES, ModelShape

    if name is None:
        return ModelShape(hidden=TINY_HIDDEN, ffn=TINY_FFN, heads=TINY_HEADS, layers=layers,
                          vocab=TINY_VOCAB)
    return replace(LLAMA_SHAPES[name], layers=layers)


def _variant(shape, rank, seq, extra, device):
    """(model, optimizer, one training step) of one variant."""
    import torch

    from crnet_megatron import CRNetConfig, build_model

    config = CRNetConfig(num_layers=shape.layers, hidden_size=shape.hidden,
                         ffn_hidden_size=shape.ffn, num_attention_heads=shape.heads,
                         crnet_rank=rank, bf16=True, params_dtype=torch.bfloat16,
                         use_cpu_initialization=device == "cpu", **extra)
    model = build_model(config, vocab_size=shape.vocab, max_sequence_length=seq, seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)
    g = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, shape.vocab, (1, seq), generator=g, device=device)
    pos = torch.arange(seq, device=device)[None]

    def step():
        opt.zero_grad(set_to_none=True)
        model(ids, pos, None, labels=ids).float().mean().backward()
        opt.step()
    return model, config, step


def _peak_gib(step, cuda: bool):
    import torch

    if not cuda:
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def measure(name, spec, warmup, repeats):
    import torch

    from crnet_megatron.analysis.counting import flops_per_token

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    llama, layers, rank, seq = spec
    shape = _shape(llama, layers)
    steps, rows = {}, []
    for variant, extra in VARIANTS.items():
        model, config, step = _variant(shape, rank, seq, extra, device)
        steps[variant] = step
        shaped = shape.as_variant(config.crnet_variant)
        ranks = config.crnet_layer_ranks or None
        rows.append(dict(shape=name, variant=variant, layers=layers, rank=rank, seq=seq,
                         flops_per_token=flops_per_token(shaped, ranks, seq)["training"],
                         params=sum(p.numel() for p in model.parameters()),
                         peak_gib=_peak_gib(step, cuda)))
    times = runner.interleaved(steps, warmup, repeats, sync)
    timing = {r["variant"]: r for r in runner.timing_rows(times, "dense")}
    for r in rows:
        t = timing[r["variant"]]
        r.update(min_ms=t["min_ms"], median_ms=t["median_ms"], vs_dense=t["ratio"])
        r["tokens_per_s"] = seq / (t["min_ms"] / 1e3)
        r["tflops"] = r["flops_per_token"] * r["tokens_per_s"] / 1e12
    return rows


COLUMNS = [("shape", "shape", ""), ("variant", "variant", ""), ("layers", "layers", ""),
           ("r", "rank", ""), ("seq", "seq", ""), ("params M", "params_m", ".1f"),
           ("step min ms", "min_ms", ".1f"), ("median ms", "median_ms", ".1f"),
           ("vs dense", "vs_dense", ".3f"), ("tokens/s", "tokens_per_s", ",.0f"),
           ("TFLOP/s", "tflops", ".1f"), ("MFU", "mfu", ".1%"), ("peak GiB", "peak_gib", ".2f")]


def main(argv=None):
    p = runner.parser(__doc__, "device", reduced=True, repeats=5, warmup=2)
    args = p.parse_args(argv)
    import torch

    from crnet_megatron.planner.hardware import peak_tflops_of

    specs = REDUCED if args.reduced else FULL
    repeats, warmup = (2, 1) if args.reduced else (args.repeats, args.warmup)
    rows = []
    with runner.one_process():
        for name, spec in specs.items():
            rows += measure(name, spec, warmup, repeats)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    peak = peak_tflops_of(device)
    for r in rows:
        r["params_m"] = r["params"] / 1e6
        r["mfu"] = r["tflops"] / peak if peak else None
    title = (f"{device}, bf16, micro-batch 1; {repeats} repeats after {warmup} warm-up, "
             f"interleaved; MFU vs {peak or 'n/a'} TFLOP/s")
    runner.finish(args, [runner.table(rows, COLUMNS, title)], device=device, rows=rows,
                  repeats=repeats, warmup=warmup, reduced=args.reduced)
    return rows


if __name__ == "__main__":
    main()
