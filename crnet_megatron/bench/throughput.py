"""Throughput of CR-Net against its FLOP limit, side by side in one process.

    crnet-bench throughput --json bench_throughput.json          # full shapes
    crnet-bench throughput --reduced                             # tiny shapes, CI

Every section times forward + backward (and, for ``step``, the optimizer) of its variants
interleaved (variant 1, 2, ..., then again), after warm-up; the table gives the minimum and the
median of the repeats and the ratio of minima to the section's baseline, beside the analytic FLOP
ratio. Sections:

* ``projections`` (LLaMA-1B shape: h 2048, ffn 5461, r 448, 512 tokens): the 7 CR-Net
  projections of one layer (``crnet``) vs the same maths in plain PyTorch
  (``plain: (x A) B + s Y``) vs Megatron's dense Column/RowParallelLinear (``dense``);
* ``layer``: one CR-Net TransformerLayer vs the dense layer 1 of the same model;
* ``step`` (``llama_60m`` shape: d 512, 8 layers, r 128, seq 256, batch 4): forward, backward
  and AdamW step of the whole model, CR-Net vs all-dense (``crnet_dense_layers = 8``), and
  CR-Net with each recompute mode vs none, in steady state: 50 measured steps after 20 of
  warm-up (a CR-Net step slows as training sharpens attention, whose gradients turn
  subnormal: the first steps mislead), with the subnormal elements one more step produces.
  On CPU subnormals are flushed to zero as the trainer does (``--no-flush-denormal`` keeps
  them).

fp32 on CPU with ``--threads`` threads (default 1); on CUDA also bf16 (``--cuda``).
"""

from __future__ import annotations

import warnings

from crnet_megatron.bench import runner

warnings.filterwarnings("ignore")

FULL = dict(proj=dict(hidden=2048, ffn=5461, heads=16, rank=448, tokens=512),
            step=dict(hidden=512, ffn=1376, heads=8, layers=8, rank=128, seq=256, batch=4))
REDUCED = dict(proj=dict(hidden=128, ffn=344, heads=4, rank=32, tokens=64),
               step=dict(hidden=64, ffn=172, heads=4, layers=4, rank=16, seq=32, batch=2))
STEP_WARMUP, STEP_REPEATS = 20, 50  # the step section: steady state, not the first steps
RECOMPUTE = {"none": {}, "crnet": dict(recompute_granularity="crnet"),
             "full": dict(recompute_granularity="full", recompute_method="uniform",
                          recompute_num_layers=1),
             "selective": dict(recompute_granularity="selective", recompute_modules=["core_attn"])}


def _config(dims, layers, device_dtype=None, **kw):
    import torch

    from crnet_megatron import CRNetConfig

    dtype = device_dtype[1] if device_dtype else torch.float32
    return CRNetConfig(num_layers=layers, hidden_size=dims["hidden"], ffn_hidden_size=dims["ffn"],
                       num_attention_heads=dims["heads"], crnet_rank=dims["rank"],
                       params_dtype=dtype,
                       bf16=dtype == torch.bfloat16,
                       use_cpu_initialization=not torch.cuda.is_available(), **kw)


def _proj_and_layer(dims, device, dtype, warmup, repeats, sync):
    """(projection timings, layer timings, FLOP ratios) on a 2-layer model: dense, then CR-Net."""
    import torch

    from crnet_megatron import build_model
    from crnet_megatron.model.linears import signed_scale

    model = build_model(_config(dims, 2, device_dtype=(device, dtype)), vocab_size=256,
                        max_sequence_length=dims["tokens"], seed=1)
    dense, crnet = model.decoder.layers[0], model.decoder.layers[1]
    h, f, t = dims["hidden"], dims["ffn"], dims["tokens"]
    g = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=dtype)

    # inputs need gradients, as inside a model (Megatron's linears compute dX regardless)
    x, ctx, act = (rnd(t, 1, n).requires_grad_() for n in (h, h, f))
    cr = [crnet.self_attention.linear_qkv, crnet.self_attention.linear_proj,
          crnet.mlp.linear_fc1, crnet.mlp.linear_fc2]
    de = [dense.self_attention.linear_qkv, dense.self_attention.linear_proj,
          dense.mlp.linear_fc1, dense.mlp.linear_fc2]
    inputs = [x, ctx, x, act]
    prevs = [rnd(t, 1, m.output_width) if hasattr(m, "output_width") else rnd(t, 1, h)
             for m in cr]
    grads = [rnd(*p.shape) for p in prevs]

    def run_crnet():
        outs = [m(i, p)[0] for m, i, p in zip(cr, inputs, prevs)]
        torch.autograd.backward(outs, grads)

    # the same maths in plain PyTorch: per position (x A_p) B_p + s_p Y_p
    plain = []
    for m in cr:
        a = m.linear_a.weight.detach().clone().requires_grad_()
        if hasattr(m, "names"):
            bs = [getattr(m.linear_b, n).weight.detach().clone().requires_grad_()
                  for n in m.names]
        else:
            bs = [m.linear_b.weight.detach().clone().requires_grad_()]
        plain.append((a, bs, m.beta.detach().clone().requires_grad_(), m.rank, m.eps))

    def run_plain():
        outs, gs = [], []
        for (a, bs, beta, r, eps), i, p, gr in zip(plain, inputs, prevs, grads):
            z = i @ a.t()
            s = signed_scale(beta, eps)
            widths = [b.shape[0] for b in bs]
            for k, (zp, b, pp, gp) in enumerate(zip(z.split(r, dim=-1), bs,
                                                    p.split(widths, dim=-1),
                                                    gr.split(widths, dim=-1))):
                outs.append(zp @ b.t() + s[k] * pp)
                gs.append(gp)
        torch.autograd.backward(outs, gs)

    dgrads = [rnd(t, 1, m.weight.shape[0]) if i % 2 == 0 else rnd(t, 1, h)
              for i, m in enumerate(de)]

    def run_dense():
        outs = [m(i)[0] for m, i in zip(de, inputs)]
        torch.autograd.backward(outs, dgrads)

    proj = runner.interleaved({"plain": run_plain, "crnet": run_crnet, "dense": run_dense},
                              warmup, repeats, sync)
    return proj, _layers(dense, crnet, rnd(t, 1, h), rnd(t, 1, h), warmup, repeats, sync)


def _layers(dense, crnet, hidden, hgrad, warmup, repeats, sync):
    """Whole layers: the CR-Net layer (its chains from the dense layer's outputs) vs the dense
    layer, forward + backward."""
    import torch


    with torch.no_grad():
        _, chains = dense(hidden, None)
    chains = type(chains)(*(c.detach() for c in chains))

    def run_layer(layer, ch):
        def fn():
            hs = hidden.detach().requires_grad_()
            out, _ = layer(hs, ch)
            out.backward(hgrad)
        return fn

    return runner.interleaved({"crnet": run_layer(crnet, chains),
                               "dense": run_layer(dense, None)}, warmup, repeats, sync)


def _flop_ratios(dims):
    from crnet_megatron.analysis.counting import ModelShape, layer_linear_flops

    shape = ModelShape(layers=2, hidden=dims["hidden"], ffn=dims["ffn"], heads=dims["heads"],
                       vocab=256)
    return layer_linear_flops(shape, dims["rank"]) / layer_linear_flops(shape, None)


def _steps(dims, device, dtype, warmup, repeats, sync, variants):
    """Whole-model forward + backward + AdamW step per variant: (times, subnormal elements
    the ops of one more step produced, per variant)."""
    import torch

    from crnet_megatron import build_model
    from crnet_megatron.diagnostics.subnormals import SubnormalsByOp

    g = torch.Generator(device=device).manual_seed(0)
    vocab, seq, batch = 2048, dims["seq"], dims["batch"]
    ids = torch.randint(0, vocab, (batch, seq), generator=g, device=device)
    labels = torch.randint(0, vocab, (batch, seq), generator=g, device=device)
    pos = torch.arange(seq, device=device)[None].expand(batch, -1)
    fns = {}
    for name, kw in variants.items():
        model = build_model(_config(dims, dims["layers"], device_dtype=(device, dtype), **kw),
                            vocab_size=vocab, max_sequence_length=seq, seed=1)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)

        def step(model=model, opt=opt):
            opt.zero_grad(set_to_none=True)
            model(ids, pos, None, labels=labels).float().mean().backward()
            opt.step()
        fns[name] = step
    times = runner.interleaved(fns, warmup, repeats, sync)
    subnormals = {}
    for name, step in fns.items():  # after the measured steps: what the trained model makes
        with SubnormalsByOp() as counter:
            step()
        subnormals[name] = sum(counter.counts.values())
    return times, subnormals


def _measure(args, dims, run, warmup, repeats, step_runs):
    """The rows of one (device, dtype) run: the sections asked for."""
    from crnet_megatron.analysis.counting import ModelShape, flops_per_token

    device, dtype, label, sync = run
    rows = []
    if {"projections", "layer"} & set(args.sections):
        proj, layer = _proj_and_layer(dims["proj"], device, dtype, warmup, repeats, sync)
        fr = _flop_ratios(dims["proj"])
        rows += _rows("projections", proj, "plain", {"plain": 1.0, "crnet": 1.0}, label)
        rows += _rows("projections vs dense", {k: proj[k] for k in ("crnet", "dense")},
                      "dense", {"crnet": fr, "dense": 1.0}, label)
        rows += _rows("layer", layer, "dense", {"crnet": fr, "dense": 1.0}, label)
    if "step" in args.sections:
        sd = dims["step"]
        steps, subnormals = _steps(sd, device, dtype, *step_runs, sync, dict(
            dense=dict(crnet_dense_layers=sd["layers"]),
            **{f"crnet/{k}": RECOMPUTE[k] for k in args.recompute}))
        shape = ModelShape(layers=sd["layers"], hidden=sd["hidden"], ffn=sd["ffn"],
                           heads=sd["heads"], vocab=2048)
        ratio = (flops_per_token(shape, sd["rank"], sd["seq"])["training"]
                 / flops_per_token(shape, None, sd["seq"])["training"])
        rows += _rows("step", {k: steps[k] for k in ("crnet/none", "dense")}, "dense",
                      {"crnet/none": ratio, "dense": 1.0}, label, subnormals)
        rows += _rows("step recompute", {k: v for k, v in steps.items() if k != "dense"},
                      "crnet/none", None, label, subnormals)
    return rows


def _rows(section, times, baseline, flop_ratio=None, dtype="fp32", subnormals=None):
    rows = runner.timing_rows(times, baseline, section=section, dtype=dtype)
    for r in rows:
        r["flop_ratio"] = flop_ratio.get(r["variant"]) if isinstance(flop_ratio, dict) else None
        r["subnormals"] = (subnormals or {}).get(r["variant"])
    return rows


COLUMNS = [("section", "section", ""), ("variant", "variant", ""), ("dtype", "dtype", ""),
           ("min ms", "min_ms", ".2f"), ("median ms", "median_ms", ".2f"),
           ("ratio (min)", "ratio", ".3f"), ("vs", "vs", ""), ("FLOP ratio", "flop_ratio", ".3f"),
           ("subnormals/step", "subnormals", "")]


def main(argv=None):
    ap = runner.parser(__doc__, "throughput", reduced=True, repeats=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sections", nargs="+", default=["projections", "layer", "step"])
    ap.add_argument("--cuda", action="store_true", help="also bf16 on CUDA")
    ap.add_argument("--recompute", nargs="+", default=list(RECOMPUTE), choices=list(RECOMPUTE),
                    help="the step section's CR-Net recompute modes")
    ap.add_argument("--step-warmup", type=int, default=STEP_WARMUP,
                    help="steps before the step section measures (steady state: >= 20)")
    ap.add_argument("--step-repeats", type=int, default=STEP_REPEATS)
    ap.add_argument("--no-flush-denormal", action="store_true",
                    help="on CPU, keep subnormal floats (the trainer flushes them by default)")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    flush = not args.no_flush_denormal and not torch.cuda.is_available()
    torch.set_flush_denormal(flush)
    dims = REDUCED if args.reduced else FULL
    step_runs = (1, 2) if args.reduced else (args.step_warmup, args.step_repeats)
    repeats, warmup = (2, 1) if args.reduced else (args.repeats, args.warmup)
    runs = [("cpu", torch.float32, "fp32", lambda: None)]
    if torch.cuda.is_available():
        runs = [("cuda", torch.float32, "fp32", torch.cuda.synchronize)]
        if args.cuda:
            runs.append(("cuda", torch.bfloat16, "bf16", torch.cuda.synchronize))
    try:
        with runner.one_process():
            rows = [row for run in runs
                    for row in _measure(args, dims, run, warmup, repeats, step_runs)]
    finally:
        torch.set_flush_denormal(False)  # the process as it was
    title = (f"threads {args.threads}; {repeats} repeats after {warmup} warm-up, interleaved "
             f"(step: {step_runs[1]} after {step_runs[0]}); "
             f"{'reduced' if args.reduced else 'full'} shapes; subnormals "
             f"{'flushed to zero' if flush else 'kept'}")
    runner.finish(args, [runner.table(rows, COLUMNS, title)], threads=args.threads,
                  repeats=repeats, warmup=warmup, step_warmup=step_runs[0],
                  step_repeats=step_runs[1], flush_denormal=flush, reduced=args.reduced,
                  dims=dims, rows=rows)
    return rows


if __name__ == "__main__":
    main()
