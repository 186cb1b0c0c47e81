"""The paper's baselines in the same framework: lowrank (W = B A, no chain), dense, frozen beta."""

import pytest
import torch

from crnet_megatron import build_model
from crnet_megatron.analysis.counting import (
    LLAMA_SHAPES,
    ModelShape,
    count_params,
    flops_per_token,
)
from tests.driver_utils import driver_cfg, run_in_process
from tests.helpers import SEQ, VOCAB, batch, scaled, tiny_config


@pytest.mark.parametrize("overrides", [
    dict(crnet_variant="lowrank"),
    dict(crnet_variant="lowrank", crnet_dense_layers=0, crnet_rank=[8, 16, 24]),
    dict(crnet_variant="dense"),
    dict(crnet_variant="dense", crnet_rank=[8, 16]),  # ranks are ignored
])
def test_variant_param_count_matches_counting(megatron_single, overrides):
    config = tiny_config(**overrides)
    model = build_model(config, vocab_size=VOCAB, max_sequence_length=SEQ)
    counts = count_params(ModelShape.from_config(config, VOCAB), config.crnet_layer_ranks)
    assert sum(p.numel() for p in model.parameters()) == counts["total"]
    for i, layer in enumerate(model.decoder.layers):
        assert sum(p.numel() for p in layer.parameters()) == counts["per_layer"][i]
    assert not any(n.endswith("beta") for n, _ in model.named_parameters())


def test_lowrank_is_crnet_without_the_chain(megatron_single):
    """Same seed: a lowrank model has CR-Net's factors; its layers output (X A) B alone."""
    torch.manual_seed(0)
    cr = build_model(tiny_config(), VOCAB, SEQ, seed=3)
    lr = build_model(tiny_config(crnet_variant="lowrank"), VOCAB, SEQ, seed=3)
    cr_params = dict(cr.named_parameters())
    for name, p in lr.named_parameters():
        torch.testing.assert_close(p, cr_params[name], rtol=0, atol=0)
    layer_cr, layer_lr = cr.decoder.layers[1], lr.decoder.layers[1]
    x = torch.randn(SEQ, 2, 64)
    chain = torch.randn(SEQ, 2, layer_cr.self_attention.linear_qkv.output_width)
    y_lr, _ = layer_lr.self_attention.linear_qkv(x, chain)
    lin = layer_cr.self_attention.linear_qkv
    expect = lin.expand(lin.codes(x))
    torch.testing.assert_close(y_lr, expect, **scaled(expect, 1e-6))
    y_cr, _ = lin(x, chain)
    assert (y_cr - y_lr).abs().max() > 0.1  # the chain term is really there in CR-Net
    ids, pos, labels = batch()
    loss = lr(ids, pos, None, labels=labels).mean()
    loss.backward()
    assert all(p.grad is not None for p in lr.parameters())


def test_variant_flops_and_paper_shapes():
    s = LLAMA_SHAPES["1b"]
    cr = flops_per_token(s, 448)["linear_forward"]
    lr = flops_per_token(s.as_variant("lowrank"), 448)["linear_forward"]
    dn = flops_per_token(s.as_variant("dense"), 448)["linear_forward"]
    assert dn == flops_per_token(s, None)["linear_forward"]
    # CR-Net adds one scale-add (2 FLOPs) per output element of each of its 23 layers
    assert cr - lr == 23 * 2 * sum(o for _, _, o in s.projections())
    assert count_params(s, 448)["total"] - count_params(s.as_variant("lowrank"), 448)["total"] == 23 * 7


@pytest.mark.parametrize("sets,needle", [
    (["model.variant=lowrank", "recompute.recompute_granularity=crnet"], "needs model.variant: crnet"),
    (["model.variant=crnet", "model.crnet_dense_layers=0"], "needs model.variant: lowrank"),
    (["model.variant=cola"], "model.variant = 'cola' is not one of"),
])
def test_variant_config_errors(sets, needle):
    from crnet_megatron.config.run_config import load_run_config

    with pytest.raises(ValueError, match=needle):
        load_run_config(None, sets)


def test_frozen_beta_stays_at_init_through_training(tiny_dataset, tmp_path):
    """crnet_learn_beta: false trains every other weight and leaves each beta at its init."""
    save = str(tmp_path / "run")
    cfg = driver_cfg(tiny_dataset, str(tmp_path / "cache"), save, "model.crnet_learn_beta=false",
                     "model.crnet_beta_init=0.5", "schedule.train_iters=3", "eval.eval_interval=3")
    out = run_in_process(cfg)
    assert out["iteration"] == 3
    from crnet_megatron.export.loader import load_megatron_model, single_process

    with single_process():
        model, _ = load_megatron_model(save)
        betas = [p for n, p in model.named_parameters() if n.endswith("beta")]
        assert betas and all(torch.all(b == 0.5) for b in betas)
        a = model.decoder.layers[1].self_attention.linear_qkv.linear_a.weight
        init = build_model(model.config, model.vocab_size, 32, seed=cfg["schedule"]["seed"])
        assert not torch.equal(a, init.decoder.layers[1].self_attention.linear_qkv.linear_a.weight)
