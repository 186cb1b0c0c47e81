"""``crnet-plan CONFIG.yaml --gpus N --gpu h100-80gb``: will the run fit, how fast will it be,
which layout is best, and how does it scale, for CR-Net and its lowrank and dense baselines
side by side (``planner/``: the memory model, the step-time model and their constants).

The layout comes from the config (``--set`` overrides keys, as for ``crnet-train``); DP is
``gpus / (TP x PP)``. Prints Markdown tables; ``--json`` writes everything, ``--plot`` the
weak-scaling log-log plot.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from dataclasses import asdict, replace
from typing import Dict, List, Optional

from crnet_megatron.cli.common import run_cli

VARIANTS = ("crnet", "lowrank", "dense")


def plan_from_config(cfg, gpus: int, vocab: int = 0):
    """The CR-Net ``Plan`` of a run config on ``gpus`` GPUs."""
    from crnet_megatron.analysis.counting import ModelShape
    from crnet_megatron.config import run_config
    from crnet_megatron.config.megatron_configs import to_crnet_config
    from crnet_megatron.planner.per_rank import Plan
    from crnet_megatron.training import preflight

    m, p, s = cfg["model"], cfg["parallel"], cfg["schedule"]
    tp, pp = p["tensor_model_parallel_size"], p["pipeline_model_parallel_size"]
    if gpus % (tp * pp):
        raise ValueError(f"--gpus {gpus} is not a multiple of TP x PP = {tp} x {pp}; set "
                         "parallel.tensor_model_parallel_size / pipeline_model_parallel_size")
    preflight.check_layout(cfg, gpus)  # the rules a real run checks, named
    single = copy.deepcopy(cfg)
    single["parallel"].update(tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                              sequence_parallel=False)
    single["model"]["variant"] = "crnet"
    single["recompute"]["recompute_granularity"] = None
    config = to_crnet_config(single)
    vocab = vocab or _vocab(cfg)
    shape = ModelShape.from_config(config, run_config.padded_vocab(vocab, tp))
    dp = gpus // (tp * pp)
    recompute = cfg["recompute"]["recompute_granularity"] or "none"
    return Plan(shape, config.crnet_layer_ranks, m["seq_length"], tp=tp, pp=pp, dp=dp,
                micro_batch=s["micro_batch_size"], global_batch=s["global_batch_size"],
                sequence_parallel=p["sequence_parallel"], recompute=recompute,
                recompute_method=cfg["recompute"]["recompute_method"] or "uniform",
                recompute_num_layers=cfg["recompute"]["recompute_num_layers"] or 1,
                distributed_optimizer=p["use_distributed_optimizer"], bf16=cfg["optimizer"]["bf16"],
                vpp=p["virtual_pipeline_model_parallel_size"],
                first_stage_layers=p["num_layers_in_first_pipeline_stage"],
                last_stage_layers=p["num_layers_in_last_pipeline_stage"])


def _vocab(cfg) -> int:
    d = cfg["data"]
    if d["tokenizer"] and os.path.exists(d["tokenizer"]):
        from crnet_megatron.data.preprocess import open_tokenizer

        return open_tokenizer(d["tokenizer"]).get_vocab_size()
    return d["builtin_vocab_size"] if not d["data_path"] else 32000


def variant(plan, name: str):
    """The same layout for a baseline; CR-Net's own recompute becomes Megatron ``full``."""
    recompute = "full" if plan.recompute == "crnet" and name != "crnet" else plan.recompute
    return replace(plan, shape=plan.shape.as_variant(name), recompute=recompute)


def report(plan, gpu, top: int = 5, counts=(8, 16, 32, 64, 128, 256, 512, 1024),
           train_iters: int = 0) -> Dict:
    from crnet_megatron.planner.search import (
        evaluate,
        search,
        smallest_fix,
        weak_scaling,
    )

    out: Dict = dict(gpu=asdict(gpu), variants={})
    for name in VARIANTS:
        vp = variant(plan, name)
        r = evaluate(vp, gpu)
        fix = None if r["fits"] else smallest_fix(vp, gpu)
        best = search(vp, gpu, vp.gpus, top)
        base = best[0]["plan"] if best else vp
        scale_base = replace(base, dp=max(1, 8 // (base.tp * base.pp)),
                             global_batch=base.global_batch // base.dp * max(1, 8 // (base.tp * base.pp)))
        out["variants"][name] = dict(
            plan=_plan_dict(vp), memory=r["memory"], time=r["time"], fits=r["fits"],
            fix=None if fix is None else dict(plan=_plan_dict(fix["plan"]),
                                              memory_gib=fix["memory"]["total"] / 2 ** 30,
                                              tokens_per_s=fix["time"]["tokens_per_s"]),
            best=[dict(plan=_plan_dict(b["plan"]), memory_gib=b["memory"]["total"] / 2 ** 30,
                       tokens_per_s=b["time"]["tokens_per_s"], mfu=b["time"]["mfu"]) for b in best],
            weak_scaling=weak_scaling(scale_base, gpu, counts),
            train=_time_to_train(vp, r["time"]["step_s"], train_iters),
            gain=_gain(vp, r, best))
    return out


def _time_to_train(plan, step_s: float, train_iters: int) -> Dict:
    """The config's token budget (schedule.train_iters global batches) at the predicted speed."""
    hours = train_iters * step_s / 3600
    return dict(iterations=train_iters, tokens=train_iters * plan.global_batch * plan.seq,
                hours=hours, gpu_hours=hours * plan.gpus)


def _gain(plan, evaluated: Dict, best) -> Optional[Dict]:
    """How much faster the fastest fitting layout is than the config's, and the --set lines."""
    if not best or not evaluated["fits"]:
        return None
    b = best[0]["plan"]
    gain = best[0]["time"]["tokens_per_s"] / evaluated["time"]["tokens_per_s"] - 1
    if gain < 0.005:
        return dict(gain=0.0, sets=[])
    pipe = [(f"parallel.{key}", getattr(b, field)) for key, field in (
        ("virtual_pipeline_model_parallel_size", "vpp"),
        ("num_layers_in_first_pipeline_stage", "first_stage_layers"),
        ("num_layers_in_last_pipeline_stage", "last_stage_layers"))
        if getattr(b, field) is not None or getattr(plan, field) is not None]
    sets = [f"parallel.tensor_model_parallel_size={b.tp}",
            f"parallel.pipeline_model_parallel_size={b.pp}",
            *(f"{key}={'null' if value is None else value}" for key, value in pipe),
            f"schedule.micro_batch_size={b.micro_batch}",
            f"parallel.sequence_parallel={str(b.sp).lower()}",
            f"recompute.recompute_granularity={'null' if b.recompute == 'none' else b.recompute}"]
    return dict(gain=gain, sets=sets)


def _plan_dict(p) -> Dict:
    return dict(tp=p.tp, pp=p.pp, vpp=p.vpp, first_stage_layers=p.first_stage_layers,
                last_stage_layers=p.last_stage_layers, dp=p.dp, micro_batch=p.micro_batch,
                global_batch=p.global_batch,
                sequence_parallel=p.sp, recompute=p.recompute,
                distributed_optimizer=p.distributed_optimizer, gpus=p.gpus)


def _layout(d: Dict) -> str:
    pipe = f"x{d['vpp']}" if d.get("vpp") else ""
    if d.get("first_stage_layers") or d.get("last_stage_layers"):
        pipe += f" ({d.get('first_stage_layers') or '-'}/{d.get('last_stage_layers') or '-'})"
    return (f"TP={d['tp']} PP={d['pp']}{pipe} DP={d['dp']} mbs={d['micro_batch']} "
            f"recompute={d['recompute']}{' SP' if d['sequence_parallel'] else ''}")


def print_report(out: Dict, plan, gpu, config_name: str) -> None:
    gib = 2 ** 30
    v = out["variants"]
    print(f"# crnet-plan {config_name}: {plan.gpus} x {gpu.name} ({gpu.memory_gib:.0f} GiB, "
          f"{gpu.peak_tflops:.0f} TFLOP/s BF16), seq {plan.seq}, global batch {plan.global_batch}"
          f", {'bf16' if plan.bf16 else 'fp32'}, "
          f"{'distributed optimizer' if plan.distributed_optimizer else 'replicated optimizer'}\n")
    print(f"layout: {_layout(v['crnet']['plan'])} (lowrank/dense: recompute "
          f"{v['dense']['plan']['recompute']})\n")
    print("## Memory per GPU (GiB, most loaded pipeline stage)\n")
    print("| part | " + " | ".join(VARIANTS) + " |\n|---|---|---|---|")
    for part in ("weights", "gradients", "optimizer", "activations", "logits",
                 "pipeline_buffers", "framework", "total"):
        print(f"| {part} | " + " | ".join(f"{v[n]['memory'][part] / gib:.1f}" for n in VARIANTS) + " |")
    print("| parameters per GPU | " + " | ".join(f"{v[n]['memory']['params'] / 1e6:.0f}M" for n in VARIANTS) + " |")
    print(f"| fits {gpu.memory_gib:.0f} GiB | " + " | ".join("yes" if v[n]["fits"] else "**no**" for n in VARIANTS) + " |\n")
    for n in VARIANTS:
        if not v[n]["fits"]:
            f = v[n]["fix"]
            print(f"- {n} does not fit; " + (f"smallest change that fits: {_layout(f['plan'])} "
                                             f"({f['memory_gib']:.1f} GiB, {f['tokens_per_s']:,.0f} tokens/s)"
                                             if f else "no single change fits; use more GPUs"))
    print("\n## Step time (predicted)\n")
    print("| | " + " | ".join(VARIANTS) + " |\n|---|---|---|---|")
    rows = [("step (s)", "step_s", "{:.3f}"), ("tokens/s", "tokens_per_s", "{:,.0f}"),
            ("tokens/s per GPU", "tokens_per_s_per_gpu", "{:,.0f}"), ("MFU", "mfu", "{:.1%}"),
            ("compute (s)", "compute_s", "{:.3f}"), ("TP comm (s)", "tp_comm_s", "{:.3f}"),
            ("PP bubble (s)", "bubble_s", "{:.3f}"), ("PP p2p (s)", "p2p_s", "{:.3f}"),
            ("DP exposed (s)", "dp_exposed_s", "{:.3f}"), ("optimizer (s)", "optimizer_s", "{:.3f}")]
    for label, key, fmt in rows:
        print(f"| {label} | " + " | ".join(fmt.format(v[n]["time"][key]) for n in VARIANTS) + " |")
    print("\n## Weak scaling (fastest fitting layout at 8 GPUs; DP grows, per-replica batch fixed)\n")
    print("Efficiency is tokens/s per GPU against 8 GPUs. It can pass 100%: with the distributed "
          "optimizer each GPU's share of the optimizer step (and its state) shrinks as DP grows, "
          "while the global batch grows with DP too; it is not a faster model.\n")
    print("| GPUs | " + " | ".join(f"{n} tok/s/GPU | {n} eff." for n in ("crnet", "dense")) + " |")
    print("|---|---|---|---|---|")
    dense_rows = {r["gpus"]: r for r in v["dense"]["weak_scaling"]}
    for r in v["crnet"]["weak_scaling"]:
        d = dense_rows.get(r["gpus"])
        dtxt = f"{d['tokens_per_s_per_gpu']:,.0f} | {d['efficiency']:.1%}" if d else "- | -"
        print(f"| {r['gpus']} | {r['tokens_per_s_per_gpu']:,.0f} | {r['efficiency']:.1%} | {dtxt} |")
    _print_time_to_train(v)
    print(f"\n## Best layouts on {plan.gpus} GPUs (predicted tokens/s among those that fit)\n")
    print("| variant | layout | GiB | tokens/s | MFU |\n|---|---|---|---|---|")
    for n in VARIANTS:
        for b in v[n]["best"]:
            print(f"| {n} | {_layout(b['plan'])} | {b['memory_gib']:.1f} | {b['tokens_per_s']:,.0f} | {b['mfu']:.1%} |")
        if not v[n]["best"]:
            print(f"| {n} | nothing fits on {plan.gpus} GPUs | | | |")
    for n in VARIANTS:
        g = v[n]["gain"]
        if g and g["sets"]:
            print(f"\n{n}: the fastest fitting layout is {g['gain']:.0%} faster than the config's; "
                  "use it with\n  " + " ".join(f"--set {s}" for s in g["sets"]))
        elif g:
            print(f"\n{n}: the config's layout is the fastest that fits")


def _print_time_to_train(v: Dict) -> None:
    t = v["crnet"]["train"]
    print(f"\n## Time to train the config's budget ({t['iterations']:,} iterations, "
          f"{t['tokens'] / 1e9:,.2f} B tokens; predicted)\n")
    print("| | " + " | ".join(VARIANTS) + " |\n|---|---|---|---|")
    print("| hours | " + " | ".join(f"{v[n]['train']['hours']:,.1f}" for n in VARIANTS) + " |")
    print("| GPU-hours | " + " | ".join(f"{v[n]['train']['gpu_hours']:,.0f}" for n in VARIANTS)
          + " |")


def plot_weak_scaling(out: Dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for n, style in (("dense", "^-"), ("lowrank", "s--"), ("crnet", "o-")):  # CR-Net on top
        rows = out["variants"][n]["weak_scaling"]
        if not rows:
            continue
        g = [r["gpus"] for r in rows]
        t = [r["tokens_per_s"] for r in rows]
        ax.loglog(g, t, style, label=f"{n} (predicted)")
        ax.loglog(g, [t[0] * x / g[0] for x in g], ":", color=ax.lines[-1].get_color(), alpha=0.6)
    ax.set_xlabel("GPUs")
    ax.set_ylabel("tokens/s")
    ax.set_title("weak scaling (dotted: linear)")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: List[str] = None) -> int:
    p = argparse.ArgumentParser(prog="crnet-plan", description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--gpu", default="h100-80gb")
    p.add_argument("--nodes-of", type=int, default=8, help="GPUs per node (NVLink domain)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--vocab", type=int, default=0, help="vocabulary (default: the tokenizer's)")
    p.add_argument("--top", type=int, default=5)
    p.add_argument("--json")
    p.add_argument("--plot", help="weak-scaling plot (PNG)")
    args = p.parse_args(argv)
    return run_cli("crnet-plan", lambda: _main(args))


def _main(args) -> int:
    from crnet_megatron.config.run_config import load_run_config
    from crnet_megatron.parallel.environment import announce
    from crnet_megatron.planner.hardware import get_gpu

    if args.gpus < 1 or args.nodes_of < 1:
        raise ValueError("--gpus and --nodes-of must be >= 1")
    cfg = load_run_config(args.config, args.set)
    announce()
    gpu = get_gpu(args.gpu).with_(gpus_per_node=args.nodes_of)
    plan = plan_from_config(cfg, args.gpus, args.vocab)
    out = report(plan, gpu, args.top, train_iters=cfg["schedule"]["train_iters"])
    print_report(out, plan, gpu, os.path.basename(args.config))
    if args.plot:
        plot_weak_scaling(out, args.plot)
        print(f"\nweak-scaling plot: {args.plot}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
