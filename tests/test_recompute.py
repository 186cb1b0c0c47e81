"""Activation recomputation on the CR-Net model.

Gradients of every parameter with ``recompute_granularity: crnet`` (Algorithm 1) and with
Megatron's ``full``/``selective`` equal those without recompute, for TP=1, TP=2 (+SP) and PP=2.
fp32. Megatron's recompute re-runs the same ops (exact up to op order: rtol=1e-5). Algorithm 1
recovers Y by dividing by s(beta) up to crnet_checkpoint_every-1 times in a row, so its
gradients carry that round-off: rtol=1e-3. Absolute tolerances scale with each tensor (rtol x its
largest magnitude, ``helpers.scaled``).
Saved-activation bytes (counted with ``saved_tensors_hooks``) are below the ``full`` baseline
and equal the counting module's formula.
"""

import pytest
import torch

from crnet_megatron import build_model
from crnet_megatron.analysis.counting import ModelShape, recompute_saved_elements
from crnet_megatron.diagnostics.profiling import saved_activation_bytes
from crnet_megatron.parallel.recompute import crnet_recompute, megatron_full_recompute
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

EXACT = 1e-5  # fp32 rtol; atol scaled with each tensor (helpers.scaled)
INVERSE = 1e-3
BASE = dict(num_layers=6, crnet_rank=[8, 16, 8, 16, 8], crnet_checkpoint_every=3)
MODES = {
    "crnet": (dict(recompute_granularity="crnet"), INVERSE),
    "full-uniform": (dict(recompute_granularity="full", recompute_method="uniform",
                          recompute_num_layers=1), EXACT),
    "full-block": (dict(recompute_granularity="full", recompute_method="block",
                        recompute_num_layers=2), EXACT),
    "selective": (dict(recompute_granularity="selective", recompute_modules=["core_attn"]), EXACT),
}


def _grads(model):
    from crnet_megatron.parallel.groups import sync_partial_grads

    ids, pos, labels = batch()
    loss = model(ids, pos, None, labels=labels)
    loss.sum().backward()
    sync_partial_grads(model)
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _model(full=None, **overrides):
    model = build_model(tiny_config(**BASE, **overrides), vocab_size=VOCAB, max_sequence_length=SEQ)
    if full is None:
        randomize_betas(model)
    else:
        load_full_weights(model, full)
    return model


@pytest.mark.parametrize("mode", list(MODES))
def test_recompute_gradients_equal_no_recompute(megatron_single, mode):
    overrides, tol = MODES[mode]
    ref = _model()
    full = {n: p.detach().clone() for n, p in ref.named_parameters()}
    ref_loss, ref_grads = _grads(ref)
    loss, grads = _grads(_model(full, **overrides))
    torch.testing.assert_close(loss, ref_loss, **scaled(ref_loss, EXACT))
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], **scaled(ref_grads[name], tol), msg=lambda m: f"{name}: {m}")


def _tp_worker(rank, world, full, overrides):
    from crnet_megatron.parallel.groups import init_distributed

    init_distributed(tensor_model_parallel_size=world)
    cfg = dict(tensor_model_parallel_size=world, sequence_parallel=True)
    ref_loss, ref = _grads(_model(full, **cfg))
    loss, got = _grads(_model(full, **cfg, **overrides))
    return ref_loss, ref, loss, got


def test_crnet_recompute_tp2_sp(megatron_single):
    full = {n: p.detach().clone() for n, p in _model().named_parameters()}
    for ref_loss, ref, loss, got in run_distributed(
            _tp_worker, 2, full, MODES["crnet"][0], timeout=300):
        torch.testing.assert_close(loss, ref_loss, **scaled(ref_loss, EXACT))
        for name in ref:
            torch.testing.assert_close(got[name], ref[name], **scaled(ref[name], INVERSE),
                                       msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("tp,world,sp", [(1, 2, False), (2, 4, True)], ids=["pp2", "tp2-pp2-sp"])
def test_crnet_recompute_pp2(megatron_single, tp, world, sp):
    """Per-stage recompute; each stage's last layer is a checkpoint layer (no cross-stage inverse)."""
    from tests.test_pipeline import _mismatches, _pp_worker, _reference

    full, ref_losses, ref_grads = _reference(BASE)
    results = run_distributed(_pp_worker, world, full, tp, sp, False,
                              dict(BASE, recompute_granularity="crnet"), timeout=300)
    assert sum(len(r["grads"]) for r in results) == len(ref_grads) * tp
    assert _mismatches(results, ref_losses, ref_grads, tp, INVERSE) == []


def _decoder_saved_bytes(model, mode_fn):
    h = torch.randn(SEQ, BATCH, model.config.hidden_size, requires_grad=True)
    rope = model.rotary_pos_emb(SEQ)
    return saved_activation_bytes(
        lambda: mode_fn(model.decoder.layers, h, None, rope, model.config))[0]


def test_saved_bytes_below_full_and_match_formula(megatron_single):
    model = _model(recompute_granularity="crnet")
    shape = ModelShape.from_config(model.config, VOCAB)
    tokens, fp32 = SEQ * BATCH, 4
    crnet = _decoder_saved_bytes(model, crnet_recompute)
    full = _decoder_saved_bytes(model, megatron_full_recompute)
    every = model.config.crnet_checkpoint_every
    ranks = model.config.crnet_layer_ranks
    assert crnet < full
    assert crnet == tokens * fp32 * recompute_saved_elements(shape, ranks, "crnet", every)
    assert full == tokens * fp32 * recompute_saved_elements(shape, ranks, "full", every)


def test_small_beta_falls_back_to_storing_and_stays_correct(megatron_single, caplog):
    ref = _model()
    with torch.no_grad():  # layer 3's fc1 betas ~1e-4: inverting through them amplifies error
        ref.decoder.layers[2].mlp.linear_fc1.beta.fill_(1e-4)
    full = {n: p.detach().clone() for n, p in ref.named_parameters()}
    _, ref_grads = _grads(ref)
    model = _model(full, recompute_granularity="crnet")
    with caplog.at_level("WARNING", logger="crnet_megatron.parallel.recompute"):
        _, grads = _grads(model)
    assert "fc1 chain instead of inverting it (|s(beta)| < 0.01)" in caplog.text
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], **scaled(ref_grads[name], INVERSE), msg=lambda m: f"{name}: {m}")
    # exactly one more chain (layer 2's fc1 output, 2 h_ff wide; layer 2 is not in the checkpoint
    # set {3, 6}) is stored than without the fallback
    plain = _model(full, recompute_granularity="crnet", crnet_recompute_min_scale=0.0)
    extra = (_decoder_saved_bytes(model, crnet_recompute)
             - _decoder_saved_bytes(plain, crnet_recompute))
    assert extra == SEQ * BATCH * 4 * 2 * model.config.ffn_hidden_size


def test_replay_linear_backpropagates_as_the_linear_it_replays():
    """ReplayLinear returns a known output, so its backward is checked against autograd of the
    linear itself (float64), with and without a gradient transform."""
    from crnet_megatron.model.replay_ops import replay_linear

    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 2, 6, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(3, 2, 4, generator=g, dtype=torch.float64)
    for transform in (None, lambda t: 2.0 * t):
        ref = torch.nn.functional.linear(x, w)
        gx, gw = torch.autograd.grad(ref, (x, w), dy if transform is None else transform(dy))
        out = replay_linear(x, w, ref.detach(), transform)
        torch.testing.assert_close(out, ref.detach(), rtol=0, atol=0)
        rx, rw = torch.autograd.grad(out, (x, w), dy)
        torch.testing.assert_close(rx, gx)
        torch.testing.assert_close(rw, gw)


def test_projections_implement_the_interface(megatron_single):
    from crnet_megatron.model.projection import CRNetProjection

    model = _model()
    layer = model.decoder.layers[1]
    for m in (layer.self_attention.linear_qkv, layer.self_attention.linear_proj,
              layer.mlp.linear_fc1, layer.mlp.linear_fc2):
        assert isinstance(m, CRNetProjection), type(m).__name__
    assert not isinstance(model.decoder.layers[0].self_attention.linear_qkv, CRNetProjection)


def test_crnet_recompute_in_float64_equals_autograd(megatron_single):
    """Algorithm 1's hand-built backward (record, invert, replay) against plain autograd on the
    same float64 model: only the inversion's round-off separates them."""
    ref = _model(params_dtype=torch.float64)
    full = {n: p.detach().clone() for n, p in ref.named_parameters()}
    ref_loss, ref_grads = _grads(ref)
    loss, grads = _grads(_model(full, params_dtype=torch.float64, recompute_granularity="crnet"))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)
    for name, g in grads.items():
        assert g.dtype == torch.float64
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-9, atol=1e-12,
                                   msg=lambda m: f"{name}: {m}")
