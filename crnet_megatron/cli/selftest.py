"""``crnet-selftest``: first contact with a cluster, checking what the example configs ship
before a long run.

    crnet-selftest                                                   # 1 GPU (or CPU)
    torchrun --nproc-per-node 8 -m crnet_megatron.cli.selftest       # a node: adds TP/PP/DP checks

Checks (``diagnostics/selfchecks.py``), each timed, as a pass/fail/skip table (``--json OUT``):
``versions`` (the banner; TE in megatron-core's tested range), ``te_vs_local`` (TE spec = local
spec logits; CUDA + TE), ``bf16_vs_fp32``, ``crnet_recompute_bf16`` (Algorithm 1 in bf16 = no
recompute), ``dist_optimizer_overlap`` (distributed optimizer + ``overlap_grad_reduce`` = plain
optimizer), ``dist_optimizer_resume`` (Apex/TE), ``tp2_sp_vs_tp1`` and ``resume_other_layout``
(TP=1 checkpoint resumed at TP=2; 2+ processes), ``pp_chains_p2p`` (PP=2 with 1F1B and interleaved = PP=1; 2+
processes), ``export_round_trip`` (a checkpoint trained here exports with equal logits),
``planner_memory`` (the planner's activation model against this device) and
``gemm_nccl_sniff`` (GEMM TFLOP/s against the nominal peak; all-reduce bandwidth).

A check this machine cannot run is skipped with the reason; the exit code is 1 when one fails.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
import warnings

from crnet_megatron.diagnostics.selfchecks import CHECKS, Skip, _world


def run_checks(names, workdir):
    import torch.distributed as dist

    rows = []
    for name in names:
        t0 = time.perf_counter()
        try:
            status, detail = "pass", CHECKS[name](workdir)
        except Skip as e:
            status, detail = "skip", str(e)
        except Exception as e:  # noqa: BLE001 - a failed check is a row, not a crash
            status, detail = "FAIL", f"{type(e).__name__}: {e}".splitlines()[0][:300]
        rows.append(dict(check=name, status=status, seconds=round(time.perf_counter() - t0, 2),
                         detail=detail))
        if dist.is_initialized():
            dist.barrier()
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(prog="crnet-selftest", description=__doc__.splitlines()[0])
    ap.add_argument("--checks", nargs="+", default=list(CHECKS), choices=list(CHECKS))
    ap.add_argument("--json", help="write the table as JSON here")
    ap.add_argument("--markdown", help="write the table as Markdown here (the training runs' own "
                                       "output stays on stdout)")
    ap.add_argument("--workdir", default="~/.cache/crnet_megatron/selftest",
                    help="scratch directory every rank can read (data cache, checkpoints)")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    import torch

    from crnet_megatron.parallel.environment import banner, versions
    from crnet_megatron.parallel.groups import destroy_distributed

    # one directory per launch, the same on every rank
    run_id = (os.environ.get("TORCHELASTIC_RUN_ID") or os.environ.get("SLURM_JOB_ID")
              or os.environ.get("MASTER_PORT") or str(os.getpid()))
    workdir = os.path.join(os.path.expanduser(args.workdir), f"run-{run_id}")
    try:
        rows = run_checks(args.checks, workdir)
    finally:
        destroy_distributed()
        if int(os.environ.get("RANK", "0")) == 0:
            shutil.rmtree(os.path.join(workdir, "dist_opt_ck"), ignore_errors=True)
    if int(os.environ.get("RANK", "0")) == 0:
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
        table = "\n".join([f"selftest on {device}, {_world()} process(es); {banner()}", "",
                           "| check | status | seconds | detail |", "|---|---|---|---|"]
                          + [f"| {r['check']} | {r['status']} | {r['seconds']} | {r['detail']} |"
                             for r in rows])
        print("\n" + table)
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write(table + "\n")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(device=device, world=_world(), versions=versions(),
                               checks=rows), f, indent=1)
    return 1 if any(r["status"] == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
