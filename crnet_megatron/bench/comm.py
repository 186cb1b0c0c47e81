"""Tensor-parallel traffic per layer per micro-batch at TP=2: CR-Net vs dense, measured and by
formula.

    crnet-bench comm --json bench_comm.json

Measured: two gloo processes run one dense layer and one CR-Net layer forward + backward under
``comm_counter.CommCounter`` (bytes one rank sends, ring algorithm). Formula:
``counting.tp_layer_comm``; the two must agree exactly (the script exits 1 if not). The LLaMA
1B and 7B rows are the formula alone (bf16, one sequence per micro-batch).
"""

from __future__ import annotations

import json
import os
import warnings

from crnet_megatron.bench import runner

warnings.filterwarnings("ignore")

MEASURED = [dict(name="small", hidden=64, ffn=96, heads=4, groups=2, rank=16, seq=16, batch=2),
            dict(name="medium", hidden=512, ffn=1376, heads=8, groups=8, rank=128, seq=128,
                 batch=2)]
FORMULA = [dict(name="llama-1b", hidden=2048, rank=448, tokens=2048),
           dict(name="llama2-7b", hidden=4096, rank=512, tokens=4096)]


def _worker(rank, world, port, shapes, out):
    import torch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from crnet_megatron.diagnostics.comm_probe import measure_layer_comm
    from crnet_megatron.parallel.groups import destroy_distributed, init_distributed

    init_distributed(tensor_model_parallel_size=world)
    results = []
    for shape in shapes:
        kw = {k: v for k, v in shape.items() if k not in ("name", "sp")}
        results.append(measure_layer_comm(**kw, tp=world, sequence_parallel=shape["sp"]))
    destroy_distributed()
    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f)


def main(argv=None):
    args = runner.parser(__doc__, "comm").parse_args(argv)
    import tempfile

    import torch.multiprocessing as mp

    from crnet_megatron.analysis.counting import comm_wire_bytes, tp_layer_comm
    from crnet_megatron.parallel.launch import free_port

    shapes = [dict(s, sp=sp) for s in MEASURED for sp in (False, True)]
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "comm.json")
        mp.start_processes(_worker, args=(2, free_port(), shapes, out), nprocs=2,
                           start_method="spawn")
        measured = json.load(open(out))
    rows, ok = [], True
    for shape, res in zip(shapes, measured):
        tokens = shape["seq"] * shape["batch"]
        row = dict(shape=shape["name"], sp=shape["sp"], source="measured = formula")
        for name, r in (("dense", None), ("crnet", shape["rank"])):
            formula = comm_wire_bytes(tp_layer_comm(shape["hidden"], r, 2, shape["sp"], tokens),
                                      2, 4)
            ok &= res[name]["wire_bytes"] == formula
            row[f"{name}_bytes"] = res[name]["wire_bytes"]
        rows.append(row)
    for shape in FORMULA:
        for sp in (False, True):
            row = dict(shape=shape["name"], sp=sp, source="formula (bf16)")
            for name, r in (("dense", None), ("crnet", shape["rank"])):
                row[f"{name}_bytes"] = comm_wire_bytes(
                    tp_layer_comm(shape["hidden"], r, 2, sp, shape["tokens"]), 2, 2)
            rows.append(row)
    for r in rows:
        r["dense_mib"], r["crnet_mib"] = r["dense_bytes"] / 2**20, r["crnet_bytes"] / 2**20
        r["ratio"] = r["crnet_bytes"] / r["dense_bytes"]
        r["sp"] = "yes" if r["sp"] else "no"
    columns = [("shape", "shape", ""), ("SP", "sp", ""), ("source", "source", ""),
               ("dense MiB", "dense_mib", ".3f"), ("CR-Net MiB", "crnet_mib", ".3f"),
               ("CR-Net / dense", "ratio", ".3f")]
    runner.finish(args, [runner.table(rows, columns), f"measured == formula: {ok}"], rows=rows,
                  measured_equals_formula=ok)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
