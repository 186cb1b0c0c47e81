"""The planner against everything the project can measure: per-rank parameters of built models
(TP=2), saved activations of real forwards (every recompute mode, TP=1 and TP=2 + SP), the
optimizer's states, the DP gradient traffic of a DP=2 run; its predictions for published dense
Megatron-LM runs; and the goals it must show. The pipeline model: ``test_planner_pipeline``."""


import pytest
import torch

from crnet_megatron.analysis.counting import LLAMA_SHAPES, ModelShape
from crnet_megatron.planner.per_rank import (
    Plan,
    norm_elements,
    stage_activation_elements,
    stage_params,
)
from tests.helpers import run_distributed

MODES = {"none": {}, "full": dict(recompute_granularity="full", recompute_method="uniform",
                                  recompute_num_layers=1),
         "selective": dict(recompute_granularity="selective", recompute_modules=["core_attn"]),
         "crnet": dict(recompute_granularity="crnet", crnet_checkpoint_every=2),
         "full-block-2": dict(recompute_granularity="full", recompute_method="block",
                              recompute_num_layers=2),
         "full-uniform-2": dict(recompute_granularity="full", recompute_method="uniform",
                                recompute_num_layers=2)}


def _measure(config, seq, batch, vocab=256):
    """(parameters on this rank, bytes of the storages the decoder's forward keeps)."""
    from megatron.core import parallel_state as ps

    from crnet_megatron import build_model
    from crnet_megatron.diagnostics.profiling import saved_activation_storage_bytes

    model = build_model(config, vocab_size=vocab, max_sequence_length=seq, seed=1)
    tp = ps.get_tensor_model_parallel_world_size()
    local = seq // tp if config.sequence_parallel else seq
    torch.manual_seed(0)
    hidden = torch.randn(local, batch, config.hidden_size, requires_grad=True)
    rope = model.rotary_pos_emb(seq)
    nbytes, _ = saved_activation_storage_bytes(
        lambda: model.decoder(hidden, None, rotary_pos_emb=rope), list(model.parameters()))
    return sum(p.numel() for p in model.parameters()), nbytes


def _predicted(config, seq, batch, mode, tp=1, vocab=256):
    shape = ModelShape.from_config(config, vocab)
    plan = Plan(shape, config.crnet_layer_ranks or None, seq, tp=tp, micro_batch=batch,
                sequence_parallel=config.sequence_parallel, recompute=mode.split("-")[0],
                recompute_method=config.recompute_method or "uniform",
                recompute_num_layers=config.recompute_num_layers or 1, bf16=False,
                backend="local", device="cpu", every=config.crnet_checkpoint_every)
    h = config.hidden_size / tp if plan.sp else config.hidden_size
    # the decoder ends with the final norm (its output is the output layer's, not counted here)
    per_token = stage_activation_elements(plan, 0) + norm_elements(plan) - h
    return stage_params(plan, 0), per_token * seq * batch * 4, plan


CASES = [("crnet", 4, 64, 172, 4, 4, 16), ("crnet", 7, 96, 256, 6, 2, 24),
         ("lowrank", 5, 96, 256, 6, 3, 24), ("dense", 4, 96, 256, 6, 6, 24)]


@pytest.mark.parametrize("projection,layers,hidden,ffn,heads,groups,rank", CASES)
def test_activation_memory_equals_saved_storage(megatron_single, projection, layers, hidden,
                                                ffn, heads, groups, rank):
    """TP=1, fp32, the local spec: the model's bytes per micro-batch equal what autograd keeps
    (storages counted once; parameters excluded), in every recompute mode, to 0.1%."""
    from crnet_megatron import CRNetConfig

    for mode, extra in MODES.items():
        if mode == "crnet" and projection != "crnet":
            continue
        config = CRNetConfig(num_layers=layers, hidden_size=hidden, ffn_hidden_size=ffn,
                             num_attention_heads=heads, num_query_groups=groups,
                             crnet_rank=rank, crnet_variant=projection,
                             use_cpu_initialization=True, **extra)
        params, measured = _measure(config, 32, 3)
        expected_params, predicted, _ = _predicted(config, 32, 3, mode)
        assert params == expected_params  # the whole model on one stage
        assert predicted == pytest.approx(measured, rel=1e-3), (projection, mode)


def _tp_worker(rank, world, projection, mode, sp):
    from crnet_megatron import CRNetConfig
    from crnet_megatron.parallel.groups import init_distributed

    init_distributed(tensor_model_parallel_size=world)
    config = CRNetConfig(num_layers=4, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
                         num_query_groups=2, crnet_rank=16, crnet_variant=projection,
                         tensor_model_parallel_size=world, sequence_parallel=sp,
                         use_cpu_initialization=True, **MODES[mode])
    return _measure(config, 16, 2)


@pytest.mark.parametrize("projection,mode,sp", [("crnet", "none", True), ("crnet", "crnet", True),
                                                ("crnet", "none", False), ("dense", "none", True)])
def test_tp2_rank_params_and_activations(projection, mode, sp):
    from crnet_megatron import CRNetConfig

    results = run_distributed(_tp_worker, 2, projection, mode, sp, timeout=300)
    config = CRNetConfig(num_layers=4, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
                         num_query_groups=2, crnet_rank=16, crnet_variant=projection,
                         tensor_model_parallel_size=2, sequence_parallel=sp,
                         use_cpu_initialization=True, **MODES[mode])
    expected_params, predicted, _ = _predicted(config, 16, 2, mode, tp=2)
    for params, measured in results:
        # embedding and output layer hold vocab/TP rows each, the final norm is replicated
        assert params == expected_params
        assert predicted == pytest.approx(measured, rel=5e-3), (projection, mode, sp)


def _dp_worker(rank, world, cfg):
    from megatron.core import parallel_state as ps

    from crnet_megatron.diagnostics.comm_counter import CommCounter
    from crnet_megatron.parallel.groups import destroy_distributed
    from crnet_megatron.training.trainer import Trainer

    try:
        trainer = Trainer(cfg)
        counter = CommCounter(None)
        def record(kind, t, group):  # every group of both ranks (DP at TP = PP = 1)
            if torch.distributed.get_world_size(group) == 2:
                counter.calls.append((kind, t.numel(), t.element_size()))

        counter._record = record
        data = trainer._iterators(trainer.train_ds, 0)
        with counter:
            trainer.train_step(data)
        opt = trainer.optimizer
        states = sum(t.numel() * t.element_size() for s in opt.optimizer.state.values()
                     for t in s.values() if torch.is_tensor(t) and t.dim() > 0)
        params = sum(p.numel() for p in trainer.model[0].parameters())
        grads = sum(b.grad_data.numel() * b.grad_data.element_size()
                    for b in trainer.model[0].buffers)
        big = [n * b for kind, n, b in counter.calls if kind == "all_reduce" and n > 1]
        return dict(params=params, states=states, grads=grads, dp_bytes=sum(big),
                    dp=ps.get_data_parallel_world_size())
    finally:
        destroy_distributed()


def test_dp2_gradient_traffic_and_optimizer_state(tiny_dataset, tmp_path):
    """One DP=2 training step of the real driver: the gradient all-reduce carries exactly the
    planner's fp32 gradient bytes, and grads + Adam states are the planner's 4 + 8 B/param."""
    from crnet_megatron.planner.memory import state_bytes_per_param
    from tests.driver_utils import driver_cfg

    cfg = driver_cfg(tiny_dataset, str(tmp_path / "cache"), None, "schedule.global_batch_size=8")
    results = run_distributed(_dp_worker, 2, cfg, timeout=300)
    for r in results:
        assert r["dp"] == 2
        plan = Plan(LLAMA_SHAPES["60m"], 128, 32, dp=2, bf16=False, distributed_optimizer=False)
        per = state_bytes_per_param(plan)
        assert r["dp_bytes"] == r["params"] * per["gradients"]
        assert r["grads"] == r["params"] * per["gradients"]
        assert r["states"] == r["params"] * per["optimizer"]


def test_published_megatron_runs_within_stated_error():
    """Dense GPT runs from Megatron-LM's README (A100 2021, H100 r0.8.0): per-GPU TFLOP/s
    predicted within 30% for every row and 20% on average (the stated accuracy; measured: 27%
    and 15%), with the kernel efficiencies taken from kernel benchmarks, not fitted here."""
    from crnet_megatron.planner.published import predict

    rows = predict("a100") + predict("h100")
    assert len(rows) == 19
    assert max(abs(r["error"]) for r in rows) < 0.30
    assert sum(abs(r["error"]) for r in rows) / len(rows) < 0.20


def test_goals_7b_on_one_gpu_13b_on_two_and_weak_scaling():
    from dataclasses import replace

    from crnet_megatron.planner.hardware import get_gpu
    from crnet_megatron.planner.search import evaluate, weak_scaling

    h100 = get_gpu("h100-80gb")
    p7 = Plan(LLAMA_SHAPES["7b"], 512, 4096, global_batch=1024, recompute="crnet")
    assert evaluate(p7, h100)["fits"]
    dense7 = replace(p7, shape=p7.shape.as_variant("dense"), recompute="full")
    assert not evaluate(dense7, h100)["fits"]
    p13 = Plan(LLAMA_SHAPES["13b"], 640, 4096, tp=2, global_batch=1024, recompute="crnet")
    assert evaluate(p13, h100)["fits"]
    # weak scaling 8 -> 1024 with one micro-batch per replica (communication-bound): CR-Net's
    # efficiency is at least the dense model's (half the gradient bytes per FLOP saved)
    base = replace(p7, dp=8, global_batch=8, recompute="none")
    cr = weak_scaling(base, h100)
    dn = weak_scaling(replace(base, shape=base.shape.as_variant("dense"), recompute="full"), h100)
    assert [r["gpus"] for r in cr] == [8, 16, 32, 64, 128, 256, 512, 1024]
    assert all(c["efficiency"] >= d["efficiency"] for c, d in zip(cr, dn))


def test_crnet_plan_cli(tmp_path, capsys):
    import json

    from crnet_megatron.cli.plan import main

    out = tmp_path / "plan.json"
    assert main(["examples/configs/llama2_7b_seq4096.yaml", "--gpus", "8", "--vocab", "32000",
                 "--json", str(out), "--plot", str(tmp_path / "ws.png")]) == 0
    text = capsys.readouterr().out
    assert "## Memory per GPU" in text and "## Weak scaling" in text and "## Best layouts" in text
    data = json.loads(out.read_text())
    assert set(data["variants"]) == {"crnet", "lowrank", "dense"}
    assert (tmp_path / "ws.png").stat().st_size > 0
    crnet = data["variants"]["crnet"]
    train = crnet["train"]  # the config's token budget at the predicted speed
    assert train["hours"] == pytest.approx(train["iterations"] * crnet["time"]["step_s"] / 3600)
    assert train["gpu_hours"] == pytest.approx(8 * train["hours"])
    assert "## Time to train the config's budget" in text and "can pass 100%" in text
    gain = crnet["gain"]  # the fastest fitting layout against the config's, with its --set lines
    best = crnet["best"][0]
    assert gain["gain"] == pytest.approx(best["tokens_per_s"] / crnet["time"]["tokens_per_s"] - 1)
    assert f"crnet: the fastest fitting layout is {gain['gain']:.0%} faster" in text
    from crnet_megatron.config.run_config import load_run_config

    cfg = load_run_config("examples/configs/llama2_7b_seq4096.yaml", gain["sets"])
    assert cfg["parallel"]["tensor_model_parallel_size"] == best["plan"]["tp"]
    assert cfg["schedule"]["micro_batch_size"] == best["plan"]["micro_batch"]
    with pytest.raises(SystemExit) as e:
        main(["examples/configs/llama2_7b_seq4096.yaml", "--gpus", "3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "--gpus 3 is not a multiple of TP x PP" in err[0]


def test_norm_term_follows_the_device_path():
    """torch's RMSNorm is unfused on CPU (input, normalised input, rstd and output kept) and a
    fused kernel on CUDA (input and rstd, as TE's): the planner's norm term follows the path, so
    the self-test's 10% activation check holds on a GPU's local spec too."""
    from crnet_megatron.analysis.counting import ModelShape
    from crnet_megatron.planner.per_rank import Plan, norm_elements

    shape = ModelShape(hidden=64, ffn=172, heads=4, layers=4, vocab=512)
    plans = {k: Plan(shape, 16, 32, backend=b, device=d)
             for k, (b, d) in dict(te=("te", "cuda"), cuda=("local", "cuda"),
                                   cpu=("local", "cpu")).items()}
    assert norm_elements(plans["te"]) == norm_elements(plans["cuda"]) == 2 * 64 + 1
    assert norm_elements(plans["cpu"]) == 3 * 64 + 1
