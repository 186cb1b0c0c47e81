"""crnet-selftest on CPU: CUDA-only checks are skipped, the rest pass, and the PP check
fails when a stage boundary drops the CR-Net chains."""

import json

from tests.helpers import run_distributed


def test_selftest_single_process(tmp_path, monkeypatch):
    from crnet_megatron.cli import selftest

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    out = tmp_path / "selftest.json"
    rc = selftest.main(["--workdir", str(tmp_path), "--json", str(out)])
    rows = {r["check"]: r for r in json.load(open(out))["checks"]}
    assert rc == 0
    assert rows["bf16_vs_fp32"]["status"] == "pass"
    assert rows["te_vs_local"]["status"] == "skip"  # no CUDA here
    assert rows["planner_memory"]["status"] == "pass"
    assert "activations predicted/measured 1.000" in rows["planner_memory"]["detail"]
    assert rows["pp_chains_p2p"]["status"] == "skip" and "torchrun" in rows["pp_chains_p2p"]["detail"]
    for name in ("versions", "crnet_recompute_bf16", "dist_optimizer_resume", "export_round_trip",
                 "gemm_nccl_sniff"):
        assert rows[name]["status"] == "pass", rows[name]
    assert rows["versions"]["detail"].startswith("versions: python ")
    assert "TFLOP/s" in rows["gemm_nccl_sniff"]["detail"]
    for name in ("tp2_sp_vs_tp1", "resume_other_layout", "dist_optimizer_overlap"):
        assert rows[name]["status"] == "skip" and "processes" in rows[name]["detail"]


def _layout_worker(rank, world, workdir):
    from crnet_megatron.cli import selftest

    return selftest.run_checks(["tp2_sp_vs_tp1", "resume_other_layout", "gemm_nccl_sniff",
                                "dist_optimizer_overlap"], workdir)


def test_selftest_layout_checks_on_two_processes(tmp_path):
    rows = run_distributed(_layout_worker, 2, str(tmp_path), timeout=400)[0]
    assert [r["status"] for r in rows] == ["pass"] * 4, rows
    assert "resumed at TP=2" in rows[1]["detail"] and "all-reduce" in rows[2]["detail"]
    assert "at DP=2" in rows[3]["detail"]


def _pp_worker(rank, world, workdir, cut_chains):
    import torch

    from crnet_megatron.cli import selftest
    from crnet_megatron.model.layer import Chains
    from crnet_megatron.parallel import pipeline

    if cut_chains:  # test double: a stage boundary that forgets the chains
        original = pipeline.pack_stage_output
        pipeline.pack_stage_output = lambda h, c, cfg: original(
            h, Chains(*(torch.zeros_like(t) for t in c)), cfg)
    return selftest.run_checks(["pp_chains_p2p"], workdir)[0]


def test_selftest_pp_check_passes_and_can_fail(tmp_path):
    ok = run_distributed(_pp_worker, 2, str(tmp_path), False, timeout=300)
    assert [r["status"] for r in ok] == ["pass", "pass"]
    cut = run_distributed(_pp_worker, 2, str(tmp_path), True, timeout=300)
    assert [r["status"] for r in cut] == ["FAIL", "FAIL"]
    assert "PP=2 losses differ from PP=1" in cut[0]["detail"]
