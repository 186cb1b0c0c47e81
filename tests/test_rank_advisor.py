"""The rank advisor: exact on synthetic rank-k residuals and on a CR-Net model's own chains;
its rank list fits the budget and is accepted by the config."""

import os

import pytest
import torch
import yaml

from crnet_megatron.analysis.residuals import (
    analyze_pair,
    capture_projection_outputs,
    needed_rank,
    suggest_ranks,
)


def test_synthetic_rank_k_residual():
    """Y_l = b Y_{l-1} + U V with rank k: the cross-layer form is exact at r = k, the direct
    approximation is not; below k both have error."""
    g = torch.Generator().manual_seed(0)
    n, d, k, b = 512, 96, 6, -0.8
    prev = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = b * prev + 0.2 * torch.randn(n, k, generator=g, dtype=torch.float64) @ \
        torch.randn(k, d, generator=g, dtype=torch.float64)
    res = analyze_pair(y, prev, [k - 2, k, k + 4])
    low, at_k, above = res["rows"]
    assert at_k["err_cross"] < 1e-6 and above["err_cross"] < 1e-6
    assert at_k["beta"] == pytest.approx(b, abs=1e-8)
    assert at_k["err_direct"] > 0.5 and low["err_cross"] > 0.01
    assert res["stable_rank"] > k  # Y_l itself is far from low rank


def test_needed_rank_and_stable_rank_are_exact():
    sing = torch.tensor([4.0, 2.0, 1.0])
    u, _ = torch.linalg.qr(torch.randn(50, 3, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(8, 3, dtype=torch.float64))
    y = u @ torch.diag(sing.double()) @ v.T
    res = analyze_pair(y, torch.zeros_like(y) + 1e-30, [1, 2])
    assert res["stable_rank"] == pytest.approx(21 / 16)
    # tails: r=1 -> sqrt(5/21) = 0.488, r=2 -> sqrt(1/21) = 0.218
    assert res["rows"][0]["err_direct"] == pytest.approx((5 / 21) ** 0.5)
    assert needed_rank(res, 0.3) == 2 and needed_rank(res, 0.5) == 1


def test_crnet_model_chains_are_exactly_rank_r():
    """In a CR-Net model Y_l - s(beta) Y_{l-1} = Z B has rank r: the analysis recovers s(beta)
    (mixed signs) with ~0 error at the model's rank, for every projection of every CR-Net layer."""
    from crnet_megatron.export.modeling_crnet import CRNetForCausalLM, CRNetLlamaConfig

    torch.manual_seed(0)
    config = CRNetLlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=96,
                              num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                              max_position_embeddings=64, crnet_projection="crnet",
                              crnet_layer_ranks=[None, 8, 8])
    model = CRNetForCausalLM(config).eval()
    betas = [(n, p) for n, p in model.named_parameters() if n.endswith("beta")]
    with torch.no_grad():
        for k, (_, p) in enumerate(betas):
            p.fill_((-1) ** k * (0.5 + 0.1 * k))
    acts = capture_projection_outputs(model, torch.randint(0, 101, (4, 64)))
    names = dict(q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj",
                 o="self_attn.o_proj", gate="mlp.gate_proj", up="mlp.up_proj", down="mlp.down_proj")
    for layer in (1, 2):
        for pos, path in names.items():
            res = analyze_pair(acts[layer][pos], acts[layer - 1][pos], [8])
            beta = model.model.layers[layer].get_submodule(path).beta.item()
            s = (1 if beta > 0 else -1) * (abs(beta) + 1e-6)
            assert res["rows"][0]["err_cross"] < 1e-5, (layer, pos)
            assert res["rows"][0]["beta"] == pytest.approx(s, rel=1e-4), (layer, pos)


def test_suggest_ranks_budget_and_shape():
    ranks = suggest_ranks([10, 40, 40, 10], total_rank=256, multiple=16, max_rank=120)
    assert sum(ranks) <= 256 and all(r % 16 == 0 and 16 <= r <= 112 for r in ranks)
    assert ranks[1] > ranks[0] and ranks[2] > ranks[3] and sum(ranks) == 256
    assert suggest_ranks([1, 1, 1], 3, 8, 64) == [8, 8, 8]  # at least one unit each


def test_tool_on_a_checkpoint(tiny_dataset, tmp_path, capsys):
    from crnet_megatron.cli.analyze import main
    from crnet_megatron.config.run_config import load_run_config
    from tests.driver_utils import driver_cfg, run_in_process

    save, out = str(tmp_path / "run"), str(tmp_path / "analysis")
    run_in_process(driver_cfg(tiny_dataset, str(tmp_path / "cache"), save,
                              "schedule.train_iters=2", "eval.eval_interval=2"))
    capsys.readouterr()
    assert main([save, "--data", tiny_dataset[2], "--out", out, "--tokens", "256",
                 "--ranks", "4,8,16"]) == 0
    assert {"residuals.csv", "heatmap.png", "suggested_ranks.yaml"} <= set(os.listdir(out))
    text = capsys.readouterr().out
    heat = int(text.split("direct error at r = ")[1].split(")")[0])
    cells = [c for ln in text.splitlines()[1:4] for c in ln.split()[1:]]
    assert heat < 16 and any(float(c.split("/")[0]) > 0.01 for c in cells)  # not all 0.00
    assert "scaled by" in text and "to the rank-sum budget 48" in text
    rows = open(os.path.join(out, "residuals.csv")).read().splitlines()
    assert len(rows) == 1 + 3 * 7 * 3  # layers 2..4 x 7 projections x 3 ranks
    suggestion = yaml.safe_load(open(os.path.join(out, "suggested_ranks.yaml")))["model"]
    assert sum(suggestion["crnet_rank"]) <= 3 * 16  # the run's own budget (rank 16, 3 layers)
    cfg = load_run_config(None, [f"model.{k}={v}" for k, v in suggestion.items()]
                          + ["model.num_layers=4", "model.hidden_size=64",
                             "model.ffn_hidden_size=172"])
    from crnet_megatron.config.megatron_configs import to_crnet_config

    assert to_crnet_config(cfg).crnet_layer_ranks == suggestion["crnet_rank"]
    assert "model.crnet_rank:" in text
