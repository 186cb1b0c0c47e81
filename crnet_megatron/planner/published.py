"""Published dense Megatron-LM runs, to check the step-time model against (README tables).

A100 (Megatron-LM README up to core_r0.5.0, SC21 paper): Selene A100-80GB, vocab 51,200,
seq 2048, full (uniform) recompute, micro-batch 1, TP = min(MP, 8) and PP = MP / TP; per-GPU
TFLOP/s counted with recompute (``96 l h^2 (1 + s/6h + V/16lh)`` per token, 4 passes).
H100 (Megatron-Core r0.8.0 README): vocab 131,072, seq 4096, no recompute, micro-batch 1,
sequence parallel, ``--overlap-grad-reduce --overlap-param-gather --tp-comm-overlap``; model
TFLOP/s (``72 l h^2 (1 + s/6h + V/12lh)``, 3 passes). GPT layers (4h MLP, multi-head
attention) are planned as a LLaMA layer of equal FLOPs (SwiGLU with ffn = 8h/3).
"""

from __future__ import annotations

from typing import Dict, List

from crnet_megatron.analysis.counting import ModelShape
from crnet_megatron.planner.hardware import get_gpu
from crnet_megatron.planner.per_rank import Plan
from crnet_megatron.planner.step_time import Overlap, step_time

# (name, heads, hidden, layers, TP, PP, GPUs, global batch, published TFLOP/s per GPU)
A100_2021 = [
    ("1.7B", 24, 2304, 24, 1, 1, 32, 512, 137), ("3.6B", 32, 3072, 30, 2, 1, 64, 512, 138),
    ("7.5B", 32, 4096, 36, 4, 1, 128, 512, 142), ("18B", 48, 6144, 40, 8, 1, 256, 1024, 135),
    ("39B", 64, 8192, 48, 8, 2, 512, 1536, 138), ("76B", 80, 10240, 60, 8, 4, 1024, 1792, 140),
    ("145B", 96, 12288, 80, 8, 8, 1536, 2304, 148), ("310B", 128, 16384, 96, 8, 16, 1920, 2160, 155),
    ("530B", 128, 20480, 105, 8, 35, 2520, 2520, 163), ("1T", 160, 25600, 128, 8, 64, 3072, 3072, 163),
]
H100_R080 = [
    ("1.7B", 16, 2048, 24, 1, 1, 48, 192, 408.8), ("7.1B", 32, 4096, 30, 2, 1, 96, 192, 465.9),
    ("16B", 48, 6144, 32, 4, 1, 192, 192, 489.1), ("32B", 56, 7168, 48, 8, 1, 384, 192, 459.6),
    ("70B", 64, 8192, 84, 8, 2, 768, 384, 419.7), ("119B", 80, 10240, 92, 8, 4, 1536, 768, 420.5),
    ("177B", 96, 12288, 96, 8, 6, 2304, 1152, 432.8), ("314B", 128, 16384, 96, 8, 8, 3072, 1536, 474.4),
    ("462B", 144, 18432, 112, 8, 16, 6144, 3072, 459.9),
]
# TE --tp-comm-overlap hides most TP communication behind GEMMs (stated assumption)
H100_TP_EXPOSED = 0.25


def _table_flops(h: int, layers: int, seq: int, vocab: int, passes: int) -> float:
    return passes * 24 * layers * h * h * (1 + seq / (6 * h) + vocab * 4 / (16 * layers * h * passes))


def predict(table: str) -> List[Dict]:
    rows = []
    if table == "a100":
        runs, gpu, seq, vocab, passes = A100_2021, get_gpu("a100-80gb"), 2048, 51200, 4
        recompute, sp, overlap = "full", False, Overlap(tp_exposed=1.0, dp_overlap=False)
    elif table == "h100":
        runs, gpu, seq, vocab, passes = H100_R080, get_gpu("h100-80gb"), 4096, 131072, 3
        recompute, sp, overlap = "none", True, Overlap(tp_exposed=H100_TP_EXPOSED, dp_overlap=True)
    else:
        raise ValueError(f"table {table!r}: 'a100' or 'h100'")
    for name, heads, h, layers, tp, pp, gpus, gbs, published in runs:
        shape = ModelShape(hidden=h, ffn=round(8 * h / 3), heads=heads, layers=layers,
                           vocab=vocab, dense_layers=layers, variant="dense")
        plan = Plan(shape, None, seq, tp=tp, pp=pp, dp=gpus // (tp * pp), micro_batch=1,
                    global_batch=gbs, sequence_parallel=sp and tp > 1, recompute=recompute,
                    distributed_optimizer=table == "h100")
        t = step_time(plan, gpu, overlap)
        tflops = _table_flops(h, layers, seq, vocab, passes) * t["tokens_per_s"] / gpus / 1e12
        rows.append(dict(table=table, model=name, tp=tp, pp=pp, gpus=gpus, global_batch=gbs,
                         published_tflops=published, predicted_tflops=tflops,
                         error=tflops / published - 1))
    return rows
