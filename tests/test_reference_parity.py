"""The Megatron-built CR-Net (TP=1) equals the plain-PyTorch Eq. 6 reference: logits, loss and
every gradient (betas included). fp32; both compute the same math in a different op order
(fused QKV, SDPA vs explicit softmax), so tolerance is rtol=1e-4, atol=1e-5."""

import pytest
import torch

from crnet_megatron import build_model
from crnet_megatron.testing.reference import ReferenceCRNet, from_megatron
from tests.helpers import SEQ, VOCAB, batch, randomize_betas, tiny_config

pytestmark = pytest.mark.quick  # python -m pytest -m quick: a first check

TOL = dict(rtol=1e-4, atol=1e-5)


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
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.copy_(mapped[name])
    return model, ref


def test_megatron_model_matches_reference(megatron_single):
    config = tiny_config(num_layers=4, crnet_rank=[8, 16, 12])
    model, ref = _pair(config)
    ids, pos, labels = batch()

    model_loss = model(ids, pos, None, labels=labels)
    ref_loss = ref.loss(ids, labels)
    torch.testing.assert_close(model_loss, ref_loss, **TOL)

    model_loss.sum().backward()
    ref_loss.sum().backward()
    grads = from_megatron({n: p.grad for n, p in model.named_parameters()}, config.num_layers,
                          config.crnet_dense_layers, config.num_attention_heads,
                          config.num_query_groups)
    names = [n for n, _ in ref.named_parameters()]
    assert any("beta" in n for n in names)
    for name, p in ref.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, **TOL, msg=lambda m: f"{name}: {m}")


def test_logits_match_reference(megatron_single):
    config = tiny_config()
    model, ref = _pair(config)
    ids, pos, _ = batch(1)
    logits = model(ids, pos, None)  # [b, s, V] with TP=1
    torch.testing.assert_close(logits, ref(ids), **TOL)
