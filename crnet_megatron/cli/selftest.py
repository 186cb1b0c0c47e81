"""First contact with a cluster: check the GPU paths before a long run.

    crnet-selftest                               # 1 GPU (or CPU)
    torchrun --nproc-per-node 8 -m crnet_megatron.cli.selftest          # a whole node: adds the PP check

Checks, each with a timing, as a pass/fail/skip table (and ``--json OUT``):

* ``te_vs_local``: the Transformer Engine layer spec gives the same logits as the local spec on
  the same (layout-invariant) weights (needs TE and CUDA).
* ``bf16_vs_fp32``: 8 training steps in bf16 end within 2% of the fp32 losses.
* ``dist_optimizer_resume``: the distributed optimizer saves at step 4 and a resumed run ends on
  the losses of an uninterrupted 8-step run (needs Apex or TE: megatron-core 0.16.1 cannot load
  its checkpoints without them).
* ``pp_chains_p2p``: PP=2 (CR-Net chains packed into the P2P tensor; NCCL on GPUs, gloo on CPU)
  trains to the same losses as PP=1 (needs 2+ processes).
* ``planner_memory``: ``crnet-plan``'s activation model against what autograd keeps in a real
  CR-Net forward on this device (bf16 on GPU, within 10%), and on GPU its activations + logits
  against the CUDA memory a whole forward holds for backward (within 25%).

On CPU the CUDA-only checks are reported as skipped; the exit code is 1 when any check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
import warnings

TINY = ["model.num_layers=4", "model.hidden_size=128", "model.ffn_hidden_size=344",
        "model.num_attention_heads=4", "model.crnet_rank=32", "model.seq_length=64",
        "schedule.train_iters=8", "schedule.micro_batch_size=2", "eval.eval_interval=100",
        "eval.eval_iters=1", "logging.log_interval=100", "logging.progress_bar=false",
        "logging.plot=false", "data.builtin_vocab_size=512"]


class Skip(Exception):
    """A check that cannot run here (and why)."""


def _world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _train(sets, workdir):
    """One run of the real driver; keeps the process group for the next check."""
    from megatron.core import parallel_state

    from crnet_megatron.training.run_config import load_run_config
    from crnet_megatron.training.trainer import Trainer

    gbs = 2 * _world()
    cfg = load_run_config(None, TINY + [f"schedule.global_batch_size={gbs}",
                                        f"data.cache_dir={workdir}/cache"] + list(sets))
    try:
        return Trainer(cfg).train()
    finally:
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()


def _losses(result):
    return [h["loss"] for h in result["history"]]


def _max_rel(a, b):
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b))


def check_te_vs_local(workdir):
    import torch

    from crnet_megatron.model.specs import te_available

    if not (torch.cuda.is_available() and te_available()):
        raise Skip("needs CUDA and Transformer Engine")
    from megatron.core import parallel_state

    from crnet_megatron import build_model
    from crnet_megatron.parallel.groups import init_distributed
    from crnet_megatron.training.run_config import load_run_config, to_crnet_config

    init_distributed(1, 1)
    try:
        config = to_crnet_config(load_run_config(None, TINY))
        ids = torch.randint(0, 512, (2, 64), device="cuda")
        pos = torch.arange(64, device="cuda")[None].expand(2, -1)
        logits = {}
        for backend in ("local", "te"):
            model = build_model(config, 512, 64, backend=backend, seed=1)
            logits[backend] = model(ids, pos, None).float()
        rel = ((logits["te"] - logits["local"]).norm() / logits["local"].norm()).item()
    finally:
        parallel_state.destroy_model_parallel()
    assert rel < 1e-2, f"TE vs local logits differ by {rel:.2e} (relative L2)"
    return f"relative L2 difference of logits {rel:.1e}"


def check_bf16_vs_fp32(workdir):
    fp32 = _losses(_train([], workdir))
    bf16 = _losses(_train(["optimizer.bf16=true"], workdir))
    rel = _max_rel(bf16, fp32)
    assert rel < 0.02, f"bf16 losses differ from fp32 by up to {rel:.2%}"
    return f"max relative loss difference {rel:.2e} over {len(fp32)} steps"


def check_dist_optimizer_resume(workdir):
    from crnet_megatron.training.run_config import distributed_optimizer_supported

    if not distributed_optimizer_supported():
        raise Skip("needs Apex or Transformer Engine (megatron-core 0.16.1 cannot load "
                   "distributed-optimizer checkpoints without them)")
    sets = ["parallel.use_distributed_optimizer=true"]
    straight = _losses(_train(sets, workdir))
    ck = f"{workdir}/dist_opt_ck"
    shutil.rmtree(ck, ignore_errors=True) if int(os.environ.get("RANK", "0")) == 0 else None
    _train(sets + [f"checkpoint.save={ck}", "schedule.exit_interval=4"], workdir)
    resumed = _train(sets + [f"checkpoint.save={ck}"], workdir)
    assert [h["iteration"] for h in resumed["history"]] == [5, 6, 7, 8], "did not resume at 4"
    rel = _max_rel(_losses(resumed), straight[4:])
    assert rel < 1e-5, f"resumed losses differ by {rel:.2e}"
    return f"resumed at step 4; max relative loss difference {rel:.1e}"


def check_pp_chains_p2p(workdir):
    if _world() < 2 or _world() % 2:
        raise Skip("needs an even number (2+) of processes: torchrun --nproc-per-node 2 ...")
    pp1 = _losses(_train([], workdir))
    pp2 = _losses(_train(["parallel.pipeline_model_parallel_size=2"], workdir))
    rel = _max_rel(pp2, pp1)
    import torch

    tol = 1e-4 if torch.cuda.is_available() else 2e-5  # fp32; GPU reductions reorder more
    assert rel < tol, f"PP=2 losses differ from PP=1 by {rel:.2e}"
    return f"max relative loss difference {rel:.1e} over {len(pp1)} steps"


def check_planner_memory(workdir):
    import torch
    from megatron.core import parallel_state

    from crnet_megatron import build_model
    from crnet_megatron.analysis.counting import ModelShape
    from crnet_megatron.parallel.groups import init_distributed
    from crnet_megatron.planner.memory import stage_memory
    from crnet_megatron.planner.per_rank import (
        Plan,
        norm_elements,
        stage_activation_elements,
    )
    from crnet_megatron.testing.profiling import saved_activation_storage_bytes
    from crnet_megatron.training.run_config import load_run_config, to_crnet_config

    if _world() > 1:
        raise Skip("single-process check")
    init_distributed(1, 1)
    cuda = torch.cuda.is_available()
    try:
        cfg = load_run_config(None, TINY + [f"optimizer.bf16={str(cuda).lower()}"])
        config = to_crnet_config(cfg)
        seq, batch, vocab = 64, 2, 512
        model = build_model(config, vocab, seq, backend="local", seed=1)
        device = next(model.parameters()).device
        hidden = torch.randn(seq, batch, config.hidden_size, device=device,
                             dtype=config.params_dtype, requires_grad=True)
        rope = model.rotary_pos_emb(seq)
        measured, _ = saved_activation_storage_bytes(
            lambda: model.decoder(hidden, None, rotary_pos_emb=rope), list(model.parameters()))
        plan = Plan(ModelShape.from_config(config, vocab), config.crnet_layer_ranks, seq,
                    micro_batch=batch, global_batch=batch, bf16=cuda, backend="local",
                    distributed_optimizer=False)
        elements = stage_activation_elements(plan, 0) + norm_elements(plan) - config.hidden_size
        predicted = elements * seq * batch * (2 if cuda else 4)
        rel = predicted / measured - 1
        detail = f"activations predicted/measured {predicted / measured:.3f}"
        assert abs(rel) < 0.10, f"activation model off by {rel:+.1%} on this device"
        if cuda:  # memory a whole forward holds for backward (decoder, logits, loss)
            del hidden
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            ids = torch.randint(0, vocab, (batch, seq), device=device)
            pos = torch.arange(seq, device=device)[None].expand(batch, -1)
            loss = model(ids, pos, None, labels=ids).float().mean()
            torch.cuda.synchronize()
            held = torch.cuda.memory_allocated() - base
            parts = stage_memory(plan, 0)
            ratio = (parts["activations"] + parts["logits"]) / held
            detail += f"; whole forward held predicted/measured {ratio:.2f}"
            del loss
            assert 0.75 < ratio < 1.33, f"forward memory model off: predicted/measured {ratio:.2f}"
    finally:
        parallel_state.destroy_model_parallel()
    return detail


CHECKS = {"te_vs_local": check_te_vs_local, "bf16_vs_fp32": check_bf16_vs_fp32,
          "dist_optimizer_resume": check_dist_optimizer_resume,
          "pp_chains_p2p": check_pp_chains_p2p, "planner_memory": check_planner_memory}


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
        print(f"\nselftest on {device}, {_world()} process(es); {banner()}\n")
        print("| check | status | seconds | detail |\n|---|---|---|---|")
        for r in rows:
            print(f"| {r['check']} | {r['status']} | {r['seconds']} | {r['detail']} |")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(device=device, world=_world(), versions=versions(),
                               checks=rows), f, indent=1)
    return 1 if any(r["status"] == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
