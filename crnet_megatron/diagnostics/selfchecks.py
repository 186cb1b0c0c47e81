"""The self-test's checks (``crnet-selftest``): each trains, saves or measures something a GPU
run depends on and returns a one-line detail, raises ``Skip`` (with the reason) where this
machine cannot run it, or fails with an assertion naming what differs."""

from __future__ import annotations

import os
import shutil
import time

from crnet_megatron.config.tiny import QUIET, TINY_MODEL

# twice the tiny width: the planner-memory check's 10% tolerance needs activations well above
# the allocator's fixed costs
TINY = TINY_MODEL + QUIET + [
    "model.hidden_size=128", "model.ffn_hidden_size=344", "model.crnet_rank=32",
    "model.seq_length=64", "schedule.train_iters=8", "schedule.micro_batch_size=2",
    "eval.eval_interval=100", "eval.eval_iters=1", "logging.log_interval=100"]


class Skip(Exception):
    """A check that cannot run here (and why)."""


def _world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


_RUNS = {}  # runs that save nothing are functions of their config: one per config per process


def _train(sets, workdir):
    """One run of the real driver; keeps the process group for the next check. A run without
    a checkpoint directory is trained once and shared by the checks that compare against it
    (several compare against the same plain run)."""
    key = (tuple(sets), workdir, _world())
    saves = any(s.startswith("checkpoint.save=") for s in sets)
    if not saves and key in _RUNS:
        return _RUNS[key]
    result = _train_now(sets, workdir)
    if not saves:
        _RUNS[key] = result
    return result


def _train_now(sets, workdir):
    from megatron.core import parallel_state

    from crnet_megatron.config.run_config import load_run_config
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
    from crnet_megatron.config.megatron_configs import to_crnet_config
    from crnet_megatron.config.run_config import load_run_config
    from crnet_megatron.parallel.groups import init_distributed

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
    """The distributed optimizer saves and resumes exactly (on a GPU without Apex/TE too: torch
    Adam's checkpoints, mended in ``parallel.compat``)."""
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
    import torch

    tol = 1e-4 if torch.cuda.is_available() else 2e-5  # fp32; GPU reductions reorder more
    pp1 = _losses(_train([], workdir))
    pp2 = ["parallel.pipeline_model_parallel_size=2"]
    rel = _max_rel(_losses(_train(pp2, workdir)), pp1)
    assert rel < tol, f"PP=2 losses differ from PP=1 by {rel:.2e}"
    # interleaved: 2 chunks of one layer per rank, the micro-batches in groups of PP
    vpp = pp2 + ["parallel.virtual_pipeline_model_parallel_size=2",
                 "schedule.micro_batch_size=1"]
    rel_vpp = _max_rel(_losses(_train(vpp, workdir)), pp1)
    assert rel_vpp < tol, f"PP=2 x VPP=2 (interleaved) losses differ from PP=1 by {rel_vpp:.2e}"
    return (f"max relative loss difference {rel:.1e} (1F1B), {rel_vpp:.1e} (interleaved) over "
            f"{len(pp1)} steps")


def check_planner_memory(workdir):
    import torch
    from megatron.core import parallel_state

    from crnet_megatron import build_model
    from crnet_megatron.analysis.counting import ModelShape
    from crnet_megatron.config.megatron_configs import to_crnet_config
    from crnet_megatron.config.run_config import load_run_config
    from crnet_megatron.diagnostics.profiling import saved_activation_storage_bytes
    from crnet_megatron.parallel.groups import init_distributed
    from crnet_megatron.planner.memory import stage_memory
    from crnet_megatron.planner.per_rank import (
        Plan,
        norm_elements,
        stage_activation_elements,
    )

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
                    device=device.type,
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


def _tol() -> float:
    import torch

    return 1e-4 if torch.cuda.is_available() else 2e-5  # fp32; GPU reductions reorder more


def _need_processes(n: int) -> None:
    if _world() < n or _world() % n:
        raise Skip(f"needs a multiple of {n} processes: torchrun --nproc-per-node {n} ...")


def _like_plain(workdir, sets, what, plain_sets=(), tol=None) -> str:
    """A run with ``sets`` has the losses of one with ``plain_sets`` (``tol``: fp32's by
    default), or the check fails naming ``what``."""
    plain = _losses(_train(list(plain_sets), workdir))
    rel = _max_rel(_losses(_train(sets, workdir)), plain)
    tol = tol if tol is not None else _tol()
    assert rel < tol, f"{what}: losses differ by up to {rel:.2e} (allowed {tol:.0e})"
    return f"max relative loss difference {rel:.1e} over {len(plain)} steps at DP={_world()}"


def check_tp2_sp_vs_tp1(workdir):
    """What the example configs ship: TP=2 with sequence parallel trains like TP=1."""
    _need_processes(2)
    return _like_plain(workdir, ["parallel.tensor_model_parallel_size=2",
                                 "parallel.sequence_parallel=true"], "TP=2+SP against TP=1")


def check_crnet_recompute_bf16(workdir):
    """Algorithm 1 in bf16 (TE where present): the same training as without recompute."""
    return _like_plain(workdir, ["optimizer.bf16=true", "recompute.recompute_granularity=crnet",
                                 "recompute.crnet_checkpoint_every=2"],
                       "bf16 with CR-Net recompute", ["optimizer.bf16=true"], tol=0.02)


def check_dist_optimizer_overlap(workdir):
    """The distributed optimizer with overlap_grad_reduce trains like the plain optimizer
    (over DP >= 2: with one shard there is nothing to distribute)."""
    _need_processes(2)
    return _like_plain(workdir, ["parallel.use_distributed_optimizer=true",
                                 "parallel.overlap_grad_reduce=true"],
                       "distributed optimizer + overlap_grad_reduce")


def check_resume_other_layout(workdir):
    """A checkpoint saved at TP=1 resumes at TP=2 (fewer DP ranks) on the uninterrupted losses."""
    _need_processes(2)
    straight = _losses(_train([], workdir))
    ck = f"{workdir}/layout_ck"
    if int(os.environ.get("RANK", "0")) == 0:
        shutil.rmtree(ck, ignore_errors=True)
    _train([f"checkpoint.save={ck}", "schedule.exit_interval=4"], workdir)
    resumed = _train([f"checkpoint.save={ck}", "parallel.tensor_model_parallel_size=2",
                      "parallel.sequence_parallel=true"], workdir)
    assert [h["iteration"] for h in resumed["history"]] == [5, 6, 7, 8], "did not resume at 4"
    rel = _max_rel(_losses(resumed), straight[4:])
    assert rel < _tol(), f"TP=2 resume differs from the TP=1 run by {rel:.2e}"
    return f"saved at TP=1 x DP={_world()}, resumed at TP=2; max relative difference {rel:.1e}"


def check_export_round_trip(workdir):
    """A checkpoint this machine trained (TE names where present) exports, and the export's
    logits equal the checkpoint's."""
    import torch

    if _world() > 1:
        raise Skip("single-process check")
    from crnet_megatron.export.hf import export
    from crnet_megatron.export.loader import (
        load_megatron_model,
        megatron_logits,
        single_process,
    )
    from crnet_megatron.export.modeling_crnet import CRNetForCausalLM

    run, out = f"{workdir}/export_run", f"{workdir}/export_out"
    shutil.rmtree(run, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    _train([f"checkpoint.save={run}", "schedule.train_iters=2", "model.crnet_beta_init=-0.7"],
           workdir)
    from crnet_megatron.parallel.groups import destroy_distributed

    destroy_distributed()
    with single_process():
        model, loaded = load_megatron_model(run)
        export(model, loaded, out)
        ids = torch.arange(32)[None] % loaded.tokenizer.vocab_size
        ref = megatron_logits(model, ids)[..., :loaded.tokenizer.vocab_size].float().cpu()
    got = CRNetForCausalLM.from_export(out).eval()(ids).logits.float()
    diff = (got - ref).abs().max().item()
    assert diff < 1e-3, f"export logits differ from the checkpoint's by {diff:.2e}"
    return f"max abs(logits(export) - logits(checkpoint)) = {diff:.1e}"


def check_versions(workdir):
    """The versions this run uses; Transformer Engine, where present, in megatron-core
    0.16.1's tested range."""
    from crnet_megatron.parallel.environment import banner, te_range_problem, versions

    te = versions()["transformer-engine"]
    if te != "-":
        problem = te_range_problem(te)
        assert problem is None, problem
    return banner()


def check_gemm_nccl_sniff(workdir):
    """GEMM TFLOP/s against the device's nominal peak; all-reduce bus bandwidth across ranks."""
    import torch
    import torch.distributed as dist

    from crnet_megatron.planner.hardware import peak_tflops_of

    cuda = torch.cuda.is_available()
    n, dtype = (8192, torch.bfloat16) if cuda else (512, torch.float32)
    device = "cuda" if cuda else "cpu"
    a = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(2):
        a @ a
    sync()
    reps, t0 = 10, time.perf_counter()
    for _ in range(reps):
        a @ a
    sync()
    tflops = 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e12
    peak = peak_tflops_of(torch.cuda.get_device_name()) if cuda else None
    detail = f"GEMM {n}^3 {str(dtype).replace('torch.', '')}: {tflops:.1f} TFLOP/s"
    if peak:
        detail += f" ({tflops / peak:.0%} of {peak:.0f} nominal)"
        assert tflops > 0.1 * peak, f"GEMM at {tflops:.0f} TFLOP/s, under 10% of nominal"
    if _world() > 1:
        from megatron.core import parallel_state

        from crnet_megatron.parallel.groups import init_distributed

        init_distributed(1, 1)
        parallel_state.destroy_model_parallel()  # the default group is enough
        x = torch.ones(64 * 2 ** 20 // 2, device=device, dtype=torch.bfloat16)  # 64 MiB
        dist.all_reduce(x)
        sync()
        t0 = time.perf_counter()
        for _ in range(5):
            dist.all_reduce(x)
        sync()
        dt = (time.perf_counter() - t0) / 5
        busbw = 2 * (_world() - 1) / _world() * x.numel() * 2 / dt / 1e9
        detail += f"; all-reduce 64 MiB over {_world()} ranks: {busbw:.1f} GB/s bus bandwidth"
    return detail


CHECKS = {"versions": check_versions, "te_vs_local": check_te_vs_local,
          "bf16_vs_fp32": check_bf16_vs_fp32, "crnet_recompute_bf16": check_crnet_recompute_bf16,
          "dist_optimizer_overlap": check_dist_optimizer_overlap,
          "dist_optimizer_resume": check_dist_optimizer_resume,
          "tp2_sp_vs_tp1": check_tp2_sp_vs_tp1, "resume_other_layout": check_resume_other_layout,
          "pp_chains_p2p": check_pp_chains_p2p, "export_round_trip": check_export_round_trip,
          "planner_memory": check_planner_memory, "gemm_nccl_sniff": check_gemm_nccl_sniff}
