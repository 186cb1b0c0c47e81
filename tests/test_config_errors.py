"""Every invalid CR-Net config value raises one clear ValueError naming field, value and rule."""

import re

import pytest

from tests.helpers import tiny_config

pytestmark = pytest.mark.quick  # python -m pytest -m quick: a first check

CASES = [
    (dict(crnet_rank=0), r"crnet_rank=0 .*must be > 0"),
    (dict(crnet_rank=-4), r"crnet_rank=-4"),
    (dict(crnet_rank=32), r"crnet_rank=32 .*linear_qkv.k: rank must be < min\(h_in=64, h_out=32\)"),
    (dict(num_query_groups=4, crnet_rank=64), r"crnet_rank=64 .*must be < min"),
    (dict(crnet_rank=[8, 8, 8]), r"per-layer list needs 2 entries"),
    (dict(crnet_beta_init=0.0), r"crnet_beta_init=0 .*non-zero"),
    (dict(crnet_eps=0.0), r"crnet_eps=0.0 .*> 0"),
    (dict(crnet_dense_layers=0), r"crnet_dense_layers=0 .*\[1, num_layers=3\]"),
    (dict(crnet_rank_schedule="ends-high"), r"crnet_rank_schedule='ends-high'"),
    (dict(crnet_lowrank_init="xavier"), r"crnet_lowrank_init='xavier'"),
    # the layout rules, stated once (model.rules), in CRNetConfig's names
    (dict(num_query_groups=3), r"^CRNetConfig.num_attention_heads = 4 is not a multiple of "
                               r"CRNetConfig.num_query_groups = 3$"),
    (dict(tensor_model_parallel_size=4, num_query_groups=2, num_attention_heads=8),
     r"^CRNetConfig.num_query_groups = 2 is not divisible by "
     r"CRNetConfig.tensor_model_parallel_size = 4$"),
    (dict(tensor_model_parallel_size=3, num_attention_heads=4),
     r"^CRNetConfig.num_attention_heads = 4 is not divisible by "
     r"CRNetConfig.tensor_model_parallel_size = 3 \(each rank holds whole heads\)$"),
    (dict(pipeline_model_parallel_layout=[["embedding", "decoder"], ["decoder", "loss"]]),
     r"pipeline_model_parallel_layout.*not supported"),
    (dict(add_bias_linear=True), r"add_bias_linear=True"),
    (dict(hidden_dropout=0.1), r"no dropout"),
]


@pytest.mark.parametrize("overrides,pattern", CASES)
def test_invalid_value_raises_clear_error(overrides, pattern):
    with pytest.raises(ValueError, match=pattern):
        tiny_config(**overrides)


def test_middle_high_schedule_is_higher_in_the_middle():
    config = tiny_config(num_layers=7, crnet_rank=16, crnet_rank_schedule="middle-high")
    ranks = config.crnet_layer_ranks
    assert len(ranks) == 6 and ranks[0] == ranks[-1] == 12 and max(ranks) == ranks[2] == ranks[3]
    assert max(ranks) > 16 > ranks[0]


def _field_names():
    import dataclasses

    from crnet_megatron import CRNetConfig

    return [f.name for f in dataclasses.fields(CRNetConfig) if f.init]


def test_every_unhonoured_megatron_switch_is_refused_by_name():
    """Walks every field of CRNetConfig (so a new megatron-core field is covered the day it
    appears): a field outside the allowlist set to anything but its default is refused with one
    line naming it; an allowlisted or CR-Net field is not refused by that rule."""
    from crnet_megatron.model.switches import HONOURED

    sentinel = object()
    refused = []
    for name in _field_names():
        if name in HONOURED or name.startswith("crnet_"):
            continue
        with pytest.raises(ValueError, match=rf"^CRNetConfig\.{name}=<object object"):
            tiny_config(**{name: sentinel})
        refused.append(name)
    assert len(refused) > 150  # megatron-core 0.16.1 has about 240 fields
    assert {"normalization", "qk_layernorm", "window_size", "num_moe_experts",
            "multi_latent_attention", "mtp_num_layers", "fp4", "tp_comm_overlap",
            "pipeline_model_parallel_layout", "apply_rope_fusion", "bias_activation_fusion",
            "gradient_accumulation_fusion", "masked_softmax_fusion",
            "bias_dropout_fusion"} <= set(refused)


@pytest.mark.parametrize("name,value", [
    ("normalization", "LayerNorm"), ("qk_layernorm", True), ("window_size", (128, 0)),
    ("num_moe_experts", 8), ("multi_latent_attention", True), ("mtp_num_layers", 1),
    ("fp4", "e2m1"), ("tp_comm_overlap", True), ("apply_rope_fusion", True),
])
def test_switches_the_review_found_accepted_are_refused(name, value):
    with pytest.raises(ValueError, match=rf"^CRNetConfig\.{name}=.* is invalid: "):
        tiny_config(**{name: value})


@pytest.mark.parametrize("setting,message", [
    ("schedule.seed=100000000000000000000000", "schedule.seed = 100000000000000000000000 is out of range"),
    ("data.split=abc", "data.split = 'abc' must be train,valid,test weights"),
    ("data.split=1,2,3,4", "data.split = '1,2,3,4' must be train,valid,test weights"),
    ("data.split=0,0,0", "data.split = '0,0,0' must be train,valid,test weights"),
])
def test_out_of_range_seed_and_malformed_split_are_one_line(setting, message):
    """A seed beyond numpy's range and a split Megatron would turn into NaN: named, at load."""
    from crnet_megatron.config.run_config import load_run_config

    with pytest.raises(ValueError, match=re.escape(message)):
        load_run_config(None, [setting])


def test_blend_weights_whose_sum_overflows_are_one_line():
    from crnet_megatron.config.run_config import parse_blend

    with pytest.raises(ValueError, match="sum beyond a float's range"):
        parse_blend([1e308, "/a", 1e308, "/b"])
