"""A run is a function of its config and seed, not of its parallel layout.

Initial weights: under TP=2, PP=2, PP=4, TP=2 x PP=2 every rank's parameters are exactly its
shards of the single-process model built with the same seed (compared with ``torch.equal``).
"""

import pytest
import torch

from tests.helpers import SEQ, VOCAB, run_distributed, tiny_config

SEED = 4321
CONFIG = dict(num_layers=4, crnet_rank=[8, 16, 8])


def _state(model):
    from crnet_megatron.model.init import global_name

    return {global_name(model, n): p.detach().clone() for n, p in model.named_parameters()}


# The TP plan, written out here by name from the method (parallel/__init__.py's docstring), not
# read from the code under test: (pattern, how the full tensor is cut over TP ranks).
TP_PLAN = [
    (r"^embedding\.word_embeddings\.weight$|^output_layer\.weight$", "rows"),  # vocab-parallel
    (r"layernorm\.weight$|\.beta$", "replicated"),
    (r"\.layers\.0\.self_attention\.linear_qkv\.weight$", "rows"),  # whole query groups
    (r"\.layers\.0\.mlp\.linear_fc1\.weight$", "gate|up rows"),
    (r"\.layers\.0\.(self_attention\.linear_proj|mlp\.linear_fc2)\.weight$", "columns"),
    (r"(linear_qkv|linear_fc1)\.linear_a\.weight$", "replicated"),  # column A: r-wide codes
    (r"(linear_qkv|linear_fc1)\.linear_b\.\w+\.weight$", "rows"),  # column B: output split
    (r"(linear_proj|linear_fc2)\.linear_a\.weight$", "columns"),     # row A: input split
    (r"(linear_proj|linear_fc2)\.linear_b\.weight$", "replicated"),  # row B
]


def _expected_shard(name, full, r, t):
    import re

    cuts = [cut for pattern, cut in TP_PLAN if re.search(pattern, name)]
    assert len(cuts) == 1, f"{name}: {cuts}"
    rows = lambda x: x[r * x.shape[0] // t:(r + 1) * x.shape[0] // t]  # noqa: E731
    if cuts[0] == "replicated":
        return full
    if cuts[0] == "rows":
        return rows(full)
    if cuts[0] == "columns":
        return rows(full.T).T
    gate, up = full.chunk(2)  # [gate | up], each cut by rows, kept as [gate_r | up_r]
    return torch.cat([rows(gate), rows(up)])


def _init_worker(rank, world, tp, reference):
    from megatron.core import parallel_state as ps

    from crnet_megatron import build_model
    from crnet_megatron.parallel.groups import init_distributed

    init_distributed(tensor_model_parallel_size=tp, pipeline_model_parallel_size=world // tp)
    config = tiny_config(tensor_model_parallel_size=tp, pipeline_model_parallel_size=world // tp,
                         **CONFIG)
    model = build_model(config, vocab_size=VOCAB, max_sequence_length=SEQ, seed=SEED)
    t, r = tp, ps.get_tensor_model_parallel_rank()
    from crnet_megatron.model.init import global_name

    equal, differ = [], []
    for local, p in model.named_parameters():
        name = global_name(model, local)
        same = torch.equal(p.detach(), _expected_shard(name, reference[name], r, t))
        (equal if same else differ).append(name)
    return dict(equal=equal, differ=differ)


@pytest.mark.parametrize("tp,world", [(2, 2), (1, 2), (1, 4), (2, 4)],
                         ids=["tp2", "pp2", "pp4", "tp2-pp2"])
def test_initial_weights_equal_the_single_process_model(megatron_single, tp, world):
    from crnet_megatron import build_model

    model = build_model(tiny_config(**CONFIG), vocab_size=VOCAB, max_sequence_length=SEQ,
                        seed=SEED)
    reference = _state(model)
    results = run_distributed(_init_worker, world, tp, reference, timeout=300)
    assert [r["differ"] for r in results] == [[]] * world
    covered = {n for r in results for n in r["equal"]}
    assert covered == set(reference)


def test_layers_and_seeds_draw_distinct_streams(megatron_single):
    """Distinct global layers start different (Megatron's shared stage seed made PP stages
    repeat each other), and another seed gives another model."""
    from crnet_megatron import build_model

    a = _state(build_model(tiny_config(**CONFIG), vocab_size=VOCAB, max_sequence_length=SEQ,
                           seed=SEED))
    b = _state(build_model(tiny_config(**CONFIG), vocab_size=VOCAB, max_sequence_length=SEQ,
                           seed=SEED + 1))
    name = "self_attention.linear_qkv.linear_b.q.weight"
    assert not torch.equal(a[f"decoder.layers.1.{name}"], a[f"decoder.layers.3.{name}"])
    assert not torch.equal(a[f"decoder.layers.1.{name}"], b[f"decoder.layers.1.{name}"])
    # the stated distributions: CoLA std for the factors, scaled init for the dense o projection
    q = a[f"decoder.layers.1.{name}"]
    cola = (8 * (64 + 64)) ** -0.25  # layer 2 has rank 8
    assert abs(q.std().item() / cola - 1) < 0.15
    o = a["decoder.layers.0.self_attention.linear_proj.weight"]
    assert abs(o.std().item() / (0.02 / (2 * 4) ** 0.5) - 1) < 0.15
