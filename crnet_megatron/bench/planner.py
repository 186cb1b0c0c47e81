"""The planner against measurements and published runs: one table each, and JSON.

    crnet-bench planner [--json bench_planner.json]

1. Saved activations: real CPU forwards (fp32, local spec, TP=1) of CR-Net, lowrank and dense
   decoders at several shapes and every recompute mode; bytes of the storages autograd keeps
   (parameters excluded) against ``planner.per_rank``.
2. Published dense Megatron-LM runs (README tables, A100 2021 and H100 r0.8.0): per-GPU TFLOP/s
   predicted by ``planner.step_time`` against the published number.
"""

from __future__ import annotations

import os
import warnings

from crnet_megatron.bench import runner

warnings.filterwarnings("ignore")

MODES = {"none": {}, "full": dict(recompute_granularity="full", recompute_method="uniform",
                                  recompute_num_layers=1),
         "selective": dict(recompute_granularity="selective", recompute_modules=["core_attn"]),
         "crnet": dict(recompute_granularity="crnet")}
SHAPES = [  # variant, layers, hidden, ffn, heads, groups, rank, seq, batch
    ("crnet", 4, 128, 344, 4, 4, 32, 128, 2), ("crnet", 9, 256, 688, 8, 2, 48, 256, 2),
    ("crnet", 17, 256, 688, 8, 8, 64, 128, 4), ("lowrank", 9, 256, 688, 8, 2, 48, 256, 2),
    ("dense", 6, 256, 688, 8, 8, None, 256, 2)]


def measured_rows():
    import logging

    import torch

    from crnet_megatron import CRNetConfig, build_model
    from crnet_megatron.analysis.counting import ModelShape
    from crnet_megatron.diagnostics.profiling import saved_activation_storage_bytes
    from crnet_megatron.parallel.groups import destroy_distributed, init_distributed
    from crnet_megatron.planner.per_rank import (
        Plan,
        norm_elements,
        stage_activation_elements,
    )

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
                            device="cpu", every=config.crnet_checkpoint_every)
                pred = (stage_activation_elements(plan, 0) + norm_elements(plan) - h) * seq * b * 4
                rows.append(dict(variant=proj, layers=layers, hidden=h, rank=rank, seq=seq,
                                 batch=b, recompute=mode, measured_bytes=nbytes,
                                 predicted_bytes=pred, error=pred / nbytes - 1))
    finally:
        destroy_distributed()
    return rows


def main(argv=None):
    args = runner.parser(__doc__, "planner").parse_args(argv)
    from crnet_megatron.planner.published import predict

    rows = measured_rows()
    for r in rows:
        r["measured_mib"], r["predicted_mib"] = (r["measured_bytes"] / 2**20,
                                                 r["predicted_bytes"] / 2**20)
        r["tokens"] = f"{r['seq']}x{r['batch']}"
    activations = runner.table(rows, [
        ("variant", "variant", ""), ("layers", "layers", ""), ("h", "hidden", ""),
        ("r", "rank", ""), ("seq x batch", "tokens", ""), ("recompute", "recompute", ""),
        ("measured MiB", "measured_mib", ".3f"), ("predicted MiB", "predicted_mib", ".3f"),
        ("error", "error", "+.2%")],
        "Saved activations per micro-batch: planner vs measured (CPU, fp32, TP=1)")
    published = predict("a100") + predict("h100")
    errs = [abs(r["error"]) for r in published]
    runs = runner.table(published, [
        ("table", "table", ""), ("model", "model", ""), ("TP", "tp", ""), ("PP", "pp", ""),
        ("GPUs", "gpus", ""), ("batch", "global_batch", ""),
        ("published", "published_tflops", ".1f"), ("predicted", "predicted_tflops", ".1f"),
        ("error", "error", "+.1%")],
        "Published dense Megatron-LM runs: predicted vs published TFLOP/s per GPU")
    summary = f"mean |error| {sum(errs) / len(errs):.1%}, max {max(errs):.1%}"
    runner.finish(args, [activations, runs, summary], activations=rows, published=published)


if __name__ == "__main__":
    main()
