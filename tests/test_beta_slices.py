"""Fused projections keep one beta per original projection, applied to the right slices of
Megatron's layouts: GQA-grouped ``[q.. k v]`` for linear_qkv, ``[gate | up]`` for linear_fc1."""

import pytest
import torch

from crnet_megatron import build_model
from tests.helpers import SEQ, VOCAB, scaled, tiny_config


def _split_qkv(y, config):
    hn, groups = config.kv_channels, config.num_query_groups
    qpg = config.num_attention_heads // groups
    q, k, v = y.view(*y.shape[:2], groups, (qpg + 2) * hn).split([qpg * hn, hn, hn], dim=-1)
    return {"q": q, "k": k, "v": v}


def _split_glu(y, config):
    gate, up = y.chunk(2, dim=-1)
    return {"gate": gate, "up": up}


@pytest.mark.parametrize("module_path,names,split", [
    ("self_attention.linear_qkv", ["q", "k", "v"], _split_qkv),
    ("mlp.linear_fc1", ["gate", "up"], _split_glu),
])
def test_perturbing_one_beta_changes_only_its_slice(megatron_single, module_path, names, split):
    config = tiny_config(num_attention_heads=8, num_query_groups=2, crnet_rank=8)  # GQA: 4 q heads per group
    model = build_model(config, vocab_size=VOCAB, max_sequence_length=SEQ)
    module = model.decoder.layers[1].get_submodule(module_path)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SEQ, 2, config.hidden_size, generator=g)
    out_size = module.output_width
    prev = torch.randn(SEQ, 2, out_size, generator=g)
    with torch.no_grad():
        base = split(module(x, prev)[0], config)
        for i, changed in enumerate(names):
            module.beta[i] += 0.25
            new = split(module(x, prev)[0], config)
            module.beta[i] -= 0.25
            for name in names:
                if name == changed:
                    expect = 0.25 * split(prev, config)[name]
                    torch.testing.assert_close(new[name] - base[name], expect,
                                               **scaled(expect, 1e-4))
                else:
                    assert torch.equal(new[name], base[name]), f"beta_{changed} leaked into {name}"


def test_signed_scale_keeps_the_sign_and_adds_eps():
    from crnet_megatron.model.linears import signed_scale

    beta = torch.tensor([-0.5, 0.5, -2.0, 1e-3])
    torch.testing.assert_close(signed_scale(beta, 0.25), torch.tensor([-0.75, 0.75, -2.25, 0.251]),
                               rtol=0, atol=1e-7)


@pytest.mark.parametrize("module_path,names,split", [
    ("self_attention.linear_qkv", ["q", "k", "v"], _split_qkv),
    ("mlp.linear_fc1", ["gate", "up"], _split_glu),
    ("self_attention.linear_proj", None, None),
])
def test_chain_term_is_signed_scale_times_previous_output(megatron_single, module_path, names,
                                                          split):
    """Y(prev) - Y(0) = sign(beta)(|beta| + eps) * prev per position, with negative betas and an
    eps large enough that dropping it (or the sign) is far outside the tolerance."""
    eps = 0.25
    config = tiny_config(num_attention_heads=8, num_query_groups=2, crnet_rank=8, crnet_eps=eps)
    model = build_model(config, vocab_size=VOCAB, max_sequence_length=SEQ)
    module = model.decoder.layers[1].get_submodule(module_path)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(SEQ, 2, module.linear_a.weight.shape[1], generator=g)
    width = module.output_width if split else module.linear_b.weight.shape[0]
    with torch.no_grad():
        betas = torch.tensor([-0.5, 0.7, -1.1][:module.beta.numel()])
        module.beta.copy_(betas)
        prev = torch.randn(SEQ, 2, width, generator=g)
        diff = module(x, prev)[0] - module(x, torch.zeros_like(prev))[0]
    scales = torch.sign(betas) * (betas.abs() + eps)
    if split is None:
        torch.testing.assert_close(diff, scales[0] * prev, **scaled(scales[0] * prev, 1e-5))
        return
    parts, prev_parts = split(diff, config), split(prev, config)
    for i, name in enumerate(names):
        expect = scales[i] * prev_parts[name]
        torch.testing.assert_close(parts[name], expect, **scaled(expect, 1e-5))


@pytest.mark.parametrize("layout", ["qkv-gqa", "glu", "whole"])
def test_chain_add_gradcheck(layout):
    """The fused chain update against autograd's own derivative, in float64."""
    from crnet_megatron.model.chain_ops import chain_add, whole

    g = torch.Generator().manual_seed(3)
    if layout == "qkv-gqa":  # 2 groups of [2 q heads | k | v], head dim 3
        def slices(t):
            return list(t.view(*t.shape[:-1], 2, 12).split([6, 3, 3], dim=-1))
        width, n = 24, 3
    elif layout == "glu":
        def slices(t):
            return list(t.chunk(2, dim=-1))
        width, n = 10, 2
    else:
        slices, width, n = whole, 7, 1
    zb = torch.randn(4, 2, width, generator=g, dtype=torch.float64, requires_grad=True)
    prev = torch.randn(4, 2, width, generator=g, dtype=torch.float64, requires_grad=True)
    s = torch.tensor([-0.7, 1.3, -0.2][:n], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: chain_add(a.clone(), b, c, slices),
                                    (zb, prev, s))
    # and it is the maths it claims: zb + s_p * prev per position slice
    out = chain_add(zb.detach().clone(), prev.detach(), s.detach(), slices)
    for k, (o, z, p) in enumerate(zip(slices(out), slices(zb.detach()), slices(prev.detach()))):
        torch.testing.assert_close(o, z + s[k].detach() * p)


def test_replay_chain_backpropagates_as_chain_add():
    """Recompute's replay returns the known Y and must give chain_add's gradients (float64):
    to the B pieces (their slices of dY), to Y_prev and to s."""
    from crnet_megatron.model.chain_ops import chain_add, invert_chain, replay_chain

    def slices(t):
        return list(t.view(*t.shape[:-1], 2, 12).split([6, 3, 3], dim=-1))

    g = torch.Generator().manual_seed(4)
    shape = (4, 2, 24)
    pieces = [torch.randn(4, 2, w, generator=g, dtype=torch.float64, requires_grad=True)
              for w in (12, 6, 6)]
    prev = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
    s = torch.tensor([-0.7, 1.3, -0.2], dtype=torch.float64, requires_grad=True)
    dy = torch.randn(shape, generator=g, dtype=torch.float64)

    def assemble(ps):  # the fused GQA layout of the three pieces
        q, k, v = (p.reshape(4, 2, 2, -1) for p in ps)
        return torch.cat([q, k, v], dim=-1).reshape(shape)

    y = chain_add(assemble(pieces), prev, s, slices)
    ref = torch.autograd.grad(y, pieces + [prev, s], dy)
    out = replay_chain(y.detach(), prev, s, slices, pieces)
    torch.testing.assert_close(out, y.detach(), rtol=0, atol=0)
    got = torch.autograd.grad(out, pieces + [prev, s], dy)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)
    # and the inversion recovers Y_prev from Y and Z B
    z = torch.randn(4, 2, 5, generator=g, dtype=torch.float64)
    bs = [torch.randn(w, 5, generator=g, dtype=torch.float64) for w in (12, 6, 6)]
    y2 = chain_add(assemble([z @ b.t() for b in bs]), prev.detach(), s.detach(), slices)
    torch.testing.assert_close(invert_chain(y2, list(zip([z] * 3, bs)), s.detach(),
                                            slices).double(), prev.detach(), rtol=1e-5, atol=1e-6)


def test_beta_gradient_dots_in_bf16_match_float64():
    """The per-position ``<dY_p, Y_prev,p>`` of bf16 chains is formed with fp32 products: within
    fp32 round-off of the float64 value (bf16 products were off by about 1e-3)."""
    from crnet_megatron.model.chain_ops import position_dots

    g = torch.Generator().manual_seed(0)
    grad = torch.randn(256, 2, 96, generator=g).to(torch.bfloat16)
    prev = (torch.randn(256, 2, 96, generator=g) + 0.5).to(torch.bfloat16)
    halves = lambda t: list(t.split(48, dim=-1))  # noqa: E731 - two positions, fused layout
    got = position_dots(grad, prev, halves)
    assert got.dtype == torch.float32
    exact = torch.stack([(a.double() * b.double()).sum() for a, b in zip(halves(grad),
                                                                          halves(prev))])
    scale = torch.stack([(a.double() * b.double()).abs().sum() for a, b in zip(halves(grad),
                                                                               halves(prev))])
    assert ((got.double() - exact).abs() / scale).max() < 1e-6
    rounded = torch.stack([torch.sum(a * b, dtype=torch.float32) for a, b in zip(halves(grad),
                                                                               halves(prev))])
    assert ((rounded.double() - exact).abs() / scale).max() > 1e-5  # what bf16 products gave
