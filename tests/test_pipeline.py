"""Pipeline parallelism carries the CR-Net chains: PP=2 (and TP=2 x PP=2) equals PP=1 on the same
weights and data through Megatron's 1F1B schedule with 4 micro-batches: per-micro-batch losses
and every gradient (betas on both stages included). A test double that zeroes the carried
chains must make the comparison fail. fp32; rtol=1e-4, atol=1e-4 x each tensor's largest magnitude (reduction order only)."""

import pytest
import torch

from crnet_megatron import build_model
from tests.helpers import (
    BATCH,
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
MICROBATCHES = 4
CONFIG = dict(num_layers=4, crnet_rank=[8, 16, 8])


def _forward_step(data_iterator, model):
    ids, pos, labels = next(data_iterator)
    output = model(ids, pos, None, labels=labels)

    def loss_func(out):
        loss = out.float().mean()
        return loss, {"lm loss": loss.detach().clone()}

    return output, loss_func


def _train_step(model):
    """One forward/backward over 4 micro-batches; grads keyed by *global* parameter name."""
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    from crnet_megatron.parallel.groups import sync_partial_grads
    from crnet_megatron.parallel.pipeline import forward_backward

    data = iter([batch(seed) for seed in range(MICROBATCHES)])
    out = forward_backward(forward_step_func=_forward_step, data_iterator=data, model=model,
                           num_microbatches=MICROBATCHES, seq_length=SEQ,
                           micro_batch_size=BATCH)
    sync_partial_grads(model)
    offset = get_transformer_layer_offset(model.config)
    grads = {}
    for name, p in model.named_parameters():
        if name.startswith("decoder.layers."):
            _, _, idx, rest = name.split(".", 3)
            name = f"decoder.layers.{int(idx) + offset}.{rest}"
        grads[name] = p.grad.detach().clone()
    return [o["lm loss"] for o in out], grads


def _pp_worker(rank, world, full, tp, sequence_parallel, cut_chains, config_kw=CONFIG):
    from megatron.core import parallel_state as ps

    from crnet_megatron.model.layer import Chains
    from crnet_megatron.parallel import pipeline
    from crnet_megatron.parallel.groups import init_distributed

    sent = []  # bytes of every activation a stage really sends forward (the packed payload)
    communicate = pipeline.PayloadP2PCommunicator._communicate

    def recording(self, *, tensor_send_next=None, **kw):
        if tensor_send_next is not None:
            sent.append(tensor_send_next.numel() * tensor_send_next.element_size())
        return communicate(self, tensor_send_next=tensor_send_next, **kw)

    pipeline.PayloadP2PCommunicator._communicate = recording
    if cut_chains:  # test double: a stage boundary that forgets the chains
        original = pipeline.pack_stage_output
        pipeline.pack_stage_output = lambda h, c, cfg: original(
            h, Chains(*(torch.zeros_like(t) for t in c)), cfg)
    init_distributed(tensor_model_parallel_size=tp, pipeline_model_parallel_size=world // tp)
    config = tiny_config(tensor_model_parallel_size=tp, pipeline_model_parallel_size=world // tp,
                         sequence_parallel=sequence_parallel, **config_kw)
    model = build_model(config, vocab_size=VOCAB, max_sequence_length=SEQ)
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    from crnet_megatron.model.tp_layout import tp_split_dim

    offset = get_transformer_layer_offset(config)
    local_full, layout = {}, {}
    for name, p in model.named_parameters():
        key = name
        if name.startswith("decoder.layers."):
            _, _, idx, rest = name.split(".", 3)
            key = f"decoder.layers.{int(idx) + offset}.{rest}"
        local_full[name] = full[key]
        layout[key] = tp_split_dim(p, name)
    load_full_weights(model, local_full)
    losses, grads = _train_step(model)
    return dict(losses=losses, grads=grads, tp_rank=ps.get_tensor_model_parallel_rank(),
                last=ps.is_pipeline_last_stage(), layout=layout, sent=sent)


def _reference(config_kw=CONFIG):
    model = build_model(tiny_config(**config_kw), vocab_size=VOCAB, max_sequence_length=SEQ)
    randomize_betas(model)
    full = {n: p.detach().clone() for n, p in model.named_parameters()}
    return full, *_train_step(model)


def _mismatches(results, ref_losses, ref_grads, tp, tol=RTOL):
    from crnet_megatron.model.tp_layout import shard_for_tp

    bad = []
    for res in results:
        if res["last"]:
            for i, (a, b) in enumerate(zip(res["losses"], ref_losses)):
                if not torch.allclose(a, b, **scaled(b, tol)):
                    bad.append(f"loss[{i}] {a.item()} != {b.item()}")
        for name, g in res["grads"].items():
            expect = shard_for_tp(res["layout"][name], ref_grads[name], res["tp_rank"], tp)
            if not torch.allclose(g, expect, **scaled(expect, tol)):
                bad.append(name)
    return bad


@pytest.mark.parametrize("tp,world,sp", [(1, 2, False), (2, 4, True)], ids=["pp2", "tp2-pp2-sp"])
def test_pipeline_equals_single_stage(megatron_single, tp, world, sp):
    full, ref_losses, ref_grads = _reference()
    results = run_distributed(_pp_worker, world, full, tp, sp, False, timeout=300)
    assert sum(len(r["grads"]) for r in results) == len(ref_grads) * tp
    assert any(r["last"] and len(r["losses"]) == MICROBATCHES for r in results)
    betas = {n for r in results for n in r["grads"] if n.endswith("beta")}
    assert {"decoder.layers.1.mlp.linear_fc1.beta", "decoder.layers.3.mlp.linear_fc1.beta"} <= betas
    assert _mismatches(results, ref_losses, ref_grads, tp) == []
    # the counting module's boundary bytes are the tensor the first stage really sent
    from crnet_megatron.analysis.counting import ModelShape, pipeline_boundary

    config = tiny_config(tensor_model_parallel_size=tp, sequence_parallel=sp, **CONFIG)
    expect = pipeline_boundary(ModelShape.from_config(config, VOCAB), SEQ, BATCH, tp, sp,
                               dtype_bytes=4)["crnet_bytes"]
    first = [r["sent"] for r in results if not r["last"]]
    assert first and all(s == [expect] * MICROBATCHES for s in first), (first, expect)


def test_cut_chains_are_detected(megatron_single):
    full, ref_losses, ref_grads = _reference()
    results = run_distributed(_pp_worker, 2, full, 1, False, True, timeout=300)
    bad = _mismatches(results, ref_losses, ref_grads, 1)
    assert any(b.startswith("loss") for b in bad)
    assert "decoder.layers.2.self_attention.linear_qkv.beta" in bad


@pytest.mark.parametrize("overrides,pattern", [
    (dict(num_layers=5, pipeline_model_parallel_size=2),
     r"CRNetConfig.num_layers = 5 is not divisible"),
    (dict(num_layers=3, pipeline_model_parallel_size=4),
     r"CRNetConfig.pipeline_model_parallel_size = 4 is more than CRNetConfig.num_layers = 3"),
    (dict(num_layers=6, pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2),
     r"\(\[3, 3\]\) do not split into "
     r"CRNetConfig.virtual_pipeline_model_parallel_size = 2 equal model chunks"),
    (dict(num_layers=6, pipeline_model_parallel_size=2, num_layers_in_first_pipeline_stage=1,
          virtual_pipeline_model_parallel_size=5), r"do not split into "
     r"CRNetConfig.virtual_pipeline_model_parallel_size = 5 equal"),
    (dict(num_layers=4, pipeline_model_parallel_size=1, virtual_pipeline_model_parallel_size=2),
     r"needs pipeline_model_parallel_size >= 2"),
])
def test_invalid_pipeline_split(overrides, pattern):
    with pytest.raises(ValueError, match=pattern):
        tiny_config(**overrides)


def test_interleaving_takes_megatron_lms_p2p_settings():
    """Batched P2P swaps a PP=2 rank's activation and gradient (same peer, same shape), so an
    interleaved config uses Megatron-LM's overlapped, unbatched P2P; 1F1B keeps the defaults."""
    vpp = tiny_config(num_layers=4, pipeline_model_parallel_size=2,
                      virtual_pipeline_model_parallel_size=2)
    assert (vpp.overlap_p2p_comm, vpp.batch_p2p_comm) == (True, False)
    plain = tiny_config(num_layers=4, pipeline_model_parallel_size=2)
    assert (plain.overlap_p2p_comm, plain.batch_p2p_comm) == (False, True)


def test_p2p_private_api_is_checked_at_start_up():
    """The payload communicator overrides megatron-core's private ``_communicate``: today's
    signature passes; one without ``tensor_shape`` (a future megatron-core) is refused, named."""
    from crnet_megatron.parallel.pipeline import check_p2p_api

    check_p2p_api()

    def changed(self, *, tensor_send_next, tensor_send_prev, recv_prev, recv_next, shapes):
        pass

    with pytest.raises(RuntimeError, match=r"no longer takes the keyword arguments "
                                           r"\['tensor_shape'\]"):
        check_p2p_api(changed)
