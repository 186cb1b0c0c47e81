"""TP=2 (2 gloo processes) equals TP=1 on the same weights: loss, logits and every gradient
(each rank's gradient equals its shard of the TP=1 gradient), with sequence parallel off and on.
fp32; TP changes only the summation order of reductions: rtol=1e-4, atol=1e-4 x the tensor's
largest magnitude."""

import pytest
import torch

from crnet_megatron import build_model
from tests.helpers import (
    SEQ,
    VOCAB,
    batch,
    load_full_weights,
    randomize_betas,
    run_distributed,
    scaled,
    tiny_config,
)

RTOL = 1e-4  # fp32, scaled with each tensor (helpers.scaled)


def _loss_and_grads(model, ids, pos, labels):
    from crnet_megatron.parallel.groups import sync_partial_grads

    loss = model(ids, pos, None, labels=labels)
    loss.sum().backward()
    sync_partial_grads(model)
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _tp_worker(rank, world, full, sequence_parallel, config_kw):
    from crnet_megatron.parallel.groups import init_distributed

    init_distributed(tensor_model_parallel_size=world)
    config = tiny_config(tensor_model_parallel_size=world, sequence_parallel=sequence_parallel,
                         **config_kw)
    model = build_model(config, vocab_size=VOCAB, max_sequence_length=SEQ)
    load_full_weights(model, full)
    return _loss_and_grads(model, *batch())


CASES = [
    pytest.param(False, {}, id="tp2"),
    pytest.param(True, {}, id="tp2-sp"),
    pytest.param(True, dict(num_query_groups=4, crnet_rank=[8, 16]), id="tp2-sp-mha-ranks"),
]


@pytest.mark.parametrize("sequence_parallel,config_kw", CASES)
def test_tp2_equals_tp1(megatron_single, sequence_parallel, config_kw):
    from crnet_megatron.model.tp_layout import rules, shard_for_tp

    config = tiny_config(**config_kw)
    ref_model = build_model(config, vocab_size=VOCAB, max_sequence_length=SEQ)
    randomize_betas(ref_model)
    full = {n: p.detach().clone() for n, p in ref_model.named_parameters()}
    ref_loss, ref_grads = _loss_and_grads(ref_model, *batch())
    layout = rules(ref_model)

    results = run_distributed(_tp_worker, 2, full, sequence_parallel, config_kw)
    for rank, (loss, grads) in enumerate(results):
        torch.testing.assert_close(loss, ref_loss, **scaled(ref_loss, RTOL))
        assert grads.keys() == ref_grads.keys()
        for name, g in grads.items():
            expect = shard_for_tp(layout[name], ref_grads[name], rank, 2)
            torch.testing.assert_close(g, expect, **scaled(expect, RTOL),
                                       msg=lambda m: f"rank {rank} {name}: {m}")


def _given_group_worker(rank, world):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from crnet_megatron.diagnostics.comm_counter import CommCounter
    from crnet_megatron.model.linears import (
        CRNetColumnParallelLinear,
        CRNetRowParallelLinear,
    )
    from crnet_megatron.parallel.groups import init_distributed

    init_distributed(tensor_model_parallel_size=2)
    given = dist.new_group([0, 1])  # the same ranks, another group object
    config = tiny_config(tensor_model_parallel_size=2, sequence_parallel=True)
    col = CRNetColumnParallelLinear(64, 128, config=config, rank=8, layout="qkv",
                                    tp_group=given)
    row = CRNetRowParallelLinear(32, 64, config=config, rank=8, tp_group=given)
    x = torch.randn(SEQ // 2, 2, 64, requires_grad=True)
    h = torch.randn(SEQ, 2, 16, requires_grad=True)  # full sequence, this rank's half of 32
    with CommCounter(ps.get_tensor_model_parallel_group()) as global_calls, \
            CommCounter(given) as given_calls:
        y, z_local, _ = col.forward_with_codes(x, torch.randn(SEQ, 2, 64))
        z_full = col.gather_codes(z_local).detach()
        col.replay(x, torch.randn(SEQ, 2, 64), z_full, y.detach()).sum().backward()
        y_row, z_row, _ = row.forward_with_codes(h, torch.randn(SEQ // 2, 2, 64))
        row.replay(h, torch.randn(SEQ // 2, 2, 64), z_row.detach(), y_row.detach()).sum() \
            .backward()
    return len(global_calls.calls), sorted({kind for kind, _, _ in given_calls.calls})


def test_crnet_linears_use_the_tp_group_they_are_given():
    """Forward, recompute's replay and its backward (column codes' gather and reduce-scatter,
    the row A's sequence gather) run their collectives on the layer's own TP group (Megatron's
    ``pg_collection.tp``), never on the global one."""
    results = run_distributed(_given_group_worker, 2, timeout=200)
    assert all(n == 0 for n, _ in results), results
    assert all({"all_gather", "reduce_scatter"} <= set(kinds) for _, kinds in results), results
