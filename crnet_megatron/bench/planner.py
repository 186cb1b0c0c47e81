"""The planner against measurements and published runs: one table each, and JSON.

    crnet-bench planner [--json bench_planner.json]

1. Saved activations: real CPU forwards (fp32, local spec, TP=1) of CR-Net, lowrank and dense
   decoders at several shapes and every recompute mode; bytes of the storages autograd keeps
   (parameters excluded) against ``planner.model``.
2. Published dense Megatron-LM runs (README tables, A100 2021 and H100 r0.8.0): per-GPU TFLOP/s
   predicted by ``planner.step_time`` against the published number.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

MODES = {"none": {}, "full": dict(recompute_granularity="full", recompute_method="uniform",
                                  recompute_num_layers=1),
         "selective": dict(recompute_granularity="selective", recompute_modules=["core_attn"]),
         "crnet": dict(recompute_granularity="crnet")}
SHAPES = [  # projection, layers, hidden, ffn, heads, groups, rank, seq, batch
    ("crnet", 4, 128, 344, 4, 4, 32, 128, 2), ("crnet", 9, 256, 688, 8, 2, 48, 256, 2),
    ("crnet", 17, 256, 688, 8, 8, 64, 128, 4), ("lowrank", 9, 256, 688, 8, 2, 48, 256, 2),
    ("dense", 6, 256, 688, 8, 8, None, 256, 2)]


def measured_rows():
    import logging

    import torch

    from crnet_megatron import CRNetConfig, build_model
    from crnet_megatron.analysis.counting import ModelShape
    from crnet_megatron.parallel.groups import destroy_distributed, init_distributed
    from crnet_megatron.planner.per_rank import (
        Plan,
        norm_elements,
        stage_activation_elements,
    )
    from crnet_megatron.testing.profiling import saved_activation_storage_bytes

    logging.disable(logging.WARNING)
    os.environ.setdefault("MASTER_PORT", "29541")
    init_distributed(1, 1, seed=1)
    rows = []
    try:
        for proj, layers, h, f, heads, groups, rank, seq, b in SHAPES:
            for mode, extra in MODES.items():
                if mode == "crnet" and proj != "crnet":
                    continue
                config = CRNetConfig(num_layers=layers, hidden_size=h, ffn_hidden_size=f,
                                     num_attention_heads=heads, num_query_groups=groups,
                                     crnet_rank=rank or 16, crnet_variant=proj,
                                     use_cpu_initialization=True, **extra)
                model = build_model(config, vocab_size=512, max_sequence_length=seq, seed=1)
                hidden = torch.randn(seq, b, h, requires_grad=True)
                rope = model.rotary_pos_emb(seq)
                nbytes, _ = saved_activation_storage_bytes(
                    lambda: model.decoder(hidden, None, rotary_pos_emb=rope),
                    list(model.parameters()))
                plan = Plan(ModelShape.from_config(config, 512), config.crnet_layer_ranks or None,
                            seq, micro_batch=b, recompute=mode, bf16=False, backend="local",
                            every=config.crnet_checkpoint_every)
                pred = (stage_activation_elements(plan, 0) + norm_elements(plan) - h) * seq * b * 4
                rows.append(dict(projection=proj, layers=layers, hidden=h, rank=rank, seq=seq,
                                 batch=b, recompute=mode, measured_bytes=nbytes,
                                 predicted_bytes=pred, error=pred / nbytes - 1))
    finally:
        destroy_distributed()
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json")
    args = p.parse_args(argv)
    from crnet_megatron.planner.published import predict

    rows = measured_rows()
    print("## Saved activations per micro-batch: planner vs measured (CPU, fp32, TP=1)\n")
    print("| variant | layers | h | r | seq x batch | recompute | measured MiB | predicted MiB | error |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['projection']} | {r['layers']} | {r['hidden']} | {r['rank'] or '-'} | "
              f"{r['seq']}x{r['batch']} | {r['recompute']} | {r['measured_bytes'] / 2**20:.3f} | "
              f"{r['predicted_bytes'] / 2**20:.3f} | {r['error']:+.2%} |")
    published = predict("a100") + predict("h100")
    print("\n## Published dense Megatron-LM runs: predicted vs published TFLOP/s per GPU\n")
    print("| table | model | TP | PP | GPUs | batch | published | predicted | error |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in published:
        print(f"| {r['table']} | {r['model']} | {r['tp']} | {r['pp']} | {r['gpus']} | "
              f"{r['global_batch']} | {r['published_tflops']:.1f} | {r['predicted_tflops']:.1f} | "
              f"{r['error']:+.1%} |")
    errs = [abs(r["error"]) for r in published]
    print(f"\nmean |error| {sum(errs) / len(errs):.1%}, max {max(errs):.1%}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(activations=rows, published=published), indent=2))


if __name__ == "__main__":
    main()
