"""The planner against everything the project can measure: per-rank parameters of built models
(TP=2, PP=2), saved activations of real forwards (every recompute mode, TP=1 and TP=2 + SP),
the optimizer's states, the DP gradient traffic of a DP=2 run, the pipeline payload; its
predictions for published dense Megatron-LM runs; and the goals it must show."""

import math

import pytest
import torch

from crnet_megatron.counting import LLAMA_SHAPES, ModelShape
from crnet_megatron.planner.model import (Plan, norm_elements, stage_activation_elements,
                                          stage_params)
from tests.helpers import run_distributed

MODES = {"none": {}, "full": dict(recompute_granularity="full", recompute_method="uniform",
                                  recompute_num_layers=1),
         "selective": dict(recompute_granularity="selective", recompute_modules=["core_attn"]),
         "crnet": dict(recompute_granularity="crnet", crnet_checkpoint_every=2)}


def _measure(config, seq, batch, vocab=256):
    """(parameters on this rank, bytes of the storages the decoder's forward keeps)."""
    from megatron.core import parallel_state as ps

    from crnet_megatron import build_model
    from crnet_megatron.profiling import saved_activation_storage_bytes

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
                sequence_parallel=config.sequence_parallel, recompute=mode, bf16=False,
                backend="local", every=config.crnet_checkpoint_every)
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
                             crnet_rank=rank, crnet_projection=projection,
                             use_cpu_initialization=True, **extra)
        params, measured = _measure(config, 32, 3)
        expected_params, predicted, _ = _predicted(config, 32, 3, mode)
        assert params == expected_params  # the whole model on one stage
        assert predicted == pytest.approx(measured, rel=1e-3), (projection, mode)


def _tp_worker(rank, world, projection, mode, sp):
    from crnet_megatron import CRNetConfig
    from crnet_megatron.parallel import init_distributed

    init_distributed(tensor_model_parallel_size=world)
    config = CRNetConfig(num_layers=4, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
                         num_query_groups=2, crnet_rank=16, crnet_projection=projection,
                         tensor_model_parallel_size=world, sequence_parallel=sp,
                         use_cpu_initialization=True, **MODES[mode])
    return _measure(config, 16, 2)


@pytest.mark.parametrize("projection,mode,sp", [("crnet", "none", True), ("crnet", "crnet", True),
                                                ("crnet", "none", False), ("dense", "none", True)])
def test_tp2_rank_params_and_activations(projection, mode, sp):
    from crnet_megatron import CRNetConfig

    results = run_distributed(_tp_worker, 2, projection, mode, sp, timeout=300)
    config = CRNetConfig(num_layers=4, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
                         num_query_groups=2, crnet_rank=16, crnet_projection=projection,
                         tensor_model_parallel_size=2, sequence_parallel=sp,
                         use_cpu_initialization=True, **MODES[mode])
    expected_params, predicted, _ = _predicted(config, 16, 2, mode, tp=2)
    for params, measured in results:
        # embedding and output layer hold vocab/TP rows each, the final norm is replicated
        assert params == expected_params
        assert predicted == pytest.approx(measured, rel=1e-3), (projection, mode, sp)
