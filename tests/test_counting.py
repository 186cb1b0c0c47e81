"""Parameter/FLOP formulas: the paper's published counts, and exact agreement with built models."""

import pytest

from crnet_megatron import build_model
from crnet_megatron.analysis.counting import (
    LLAMA_SHAPES,
    ModelShape,
    count_params,
    flops_per_token,
)
from tests.helpers import SEQ, VOCAB, tiny_config

pytestmark = pytest.mark.quick  # python -m pytest -m quick: a first check


@pytest.mark.parametrize("rank,expected_m", [(448, 582.4), (512, 639.7), (None, 1339.1)])
def test_paper_1b_counts(rank, expected_m):
    total = count_params(LLAMA_SHAPES["1b"], rank)["total"]
    assert round(total / 1e6, 1) == expected_m


def test_paper_1b_linear_flop_ratio():
    """r=448 gives the paper's ~-63% linear compute (ratio 0.374)."""
    shape = LLAMA_SHAPES["1b"]
    ratio = (flops_per_token(shape, 448)["linear_forward"]
             / flops_per_token(shape, None)["linear_forward"])
    assert ratio == pytest.approx(0.374, abs=0.002)


@pytest.mark.parametrize("overrides", [
    dict(),
    dict(num_layers=4, crnet_rank=[8, 16, 24]),
    dict(num_layers=5, crnet_dense_layers=2, num_query_groups=4, crnet_rank=8),
    dict(num_layers=6, crnet_rank=16, crnet_rank_schedule="middle-high"),
])
def test_built_model_matches_formula(megatron_single, overrides):
    config = tiny_config(**overrides)
    model = build_model(config, vocab_size=VOCAB, max_sequence_length=SEQ)
    built = sum(p.numel() for p in model.parameters())
    shape = ModelShape.from_config(config, VOCAB)
    counts = count_params(shape, config.crnet_layer_ranks)
    assert built == counts["total"]
    for i, layer in enumerate(model.decoder.layers):
        assert sum(p.numel() for p in layer.parameters()) == counts["per_layer"][i]


def test_dense_and_crnet_flops_differ_by_linear_part():
    shape = LLAMA_SHAPES["7b"]
    cr, dn = flops_per_token(shape, 512, 1024), flops_per_token(shape, None, 1024)
    assert cr["attention_forward"] == dn["attention_forward"]
    assert cr["training"] == 3 * cr["forward"]
    assert cr["linear_forward"] < 0.3 * dn["linear_forward"]


def test_pipeline_boundary_ratio_matches_llama_formula():
    from crnet_megatron.analysis.counting import pipeline_boundary

    for size in ("1b", "7b"):
        s = LLAMA_SHAPES[size]
        got = pipeline_boundary(s, 1024, 1)["ratio"]
        assert got == pytest.approx(1 + (5 * s.hidden + 2 * s.ffn) / s.hidden)
