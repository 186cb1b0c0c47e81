"""The Megatron-built CR-Net (TP=1) equals the plain-PyTorch Eq. 6 reference: logits, loss and
every gradient (betas included). Both sides run in float64: they compute the same math in a
different op order (fused QKV, SDPA vs explicit softmax), and float64 keeps that order's round-off
(about 1e-14 relative, measured) far below the tolerance, so the comparison does not depend on
the CPU's fp32 summation order."""

import pytest
import torch
import torch.nn.functional as F

from crnet_megatron import build_model
from tests.helpers import SEQ, VOCAB, batch, randomize_betas, tiny_config
from tests.reference import ReferenceCRNet, from_megatron

pytestmark = pytest.mark.quick  # python -m pytest -m quick: a first check

TOL = dict(rtol=1e-9, atol=1e-11)  # float64 on both sides
FP32_RTOL = 1e-5  # a value formed in fp32 (about 1e-7 relative round-off), compared in float64


def _pair(config):
    model = build_model(config, vocab_size=VOCAB, max_sequence_length=SEQ)
    randomize_betas(model)
    ref = ReferenceCRNet(VOCAB, config.hidden_size, config.ffn_hidden_size,
                         config.num_attention_heads, config.num_query_groups, config.num_layers,
                         config.crnet_layer_ranks, config.crnet_dense_layers,
                         eps=config.crnet_eps, norm_eps=config.layernorm_epsilon)
    mapped = from_megatron(dict(model.named_parameters()), config.num_layers,
                           config.crnet_dense_layers, config.num_attention_heads,
                           config.num_query_groups)
    ref = ref.to(torch.float64)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.copy_(mapped[name])
    return model, ref


def test_megatron_model_matches_reference(megatron_single):
    config = tiny_config(num_layers=4, crnet_rank=[8, 16, 12], params_dtype=torch.float64)
    model, ref = _pair(config)
    ids, pos, labels = batch()

    # Megatron's loss (its vocab-parallel cross entropy works in fp32): fp32-sized tolerance
    model_loss = model(ids, pos, None, labels=labels)
    ref_loss = ref.loss(ids, labels)
    torch.testing.assert_close(model_loss.double(), ref_loss, rtol=FP32_RTOL, atol=0)

    # every gradient, through a float64 loss on both sides' float64 logits
    logits = model(ids, pos, None)
    F.cross_entropy(logits.flatten(0, 1), labels.flatten()).backward()
    ref_loss.mean().backward()
    grads = from_megatron({n: p.grad for n, p in model.named_parameters()}, config.num_layers,
                          config.crnet_dense_layers, config.num_attention_heads,
                          config.num_query_groups)
    names = [n for n, _ in ref.named_parameters()]
    assert all(p.grad.dtype == torch.float64 for p in ref.parameters())
    assert any("beta" in n for n in names)
    for name, p in ref.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, **TOL, msg=lambda m: f"{name}: {m}")


def test_logits_match_reference(megatron_single):
    config = tiny_config(params_dtype=torch.float64)
    model, ref = _pair(config)
    ids, pos, _ = batch(1)
    logits = model(ids, pos, None)  # [b, s, V] with TP=1
    torch.testing.assert_close(logits, ref(ids), **TOL)
