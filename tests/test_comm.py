"""TP communication per layer per micro-batch at TP=2, measured with the communication counter,
equals ``counting.tp_layer_comm`` exactly (elements by collective kind, and wire bytes), for the
dense layer and a CR-Net layer, with and without sequence parallel; the CR-Net layer makes no
more calls than the dense one and none of them is a scalar (the column betas' gradients are
summed once per step, not per micro-batch)."""

import pytest

from tests.helpers import run_distributed

SHAPE = dict(hidden=64, ffn=96, heads=4, groups=2, rank=16, seq=16, batch=2)


def _worker(rank, world, sp):
    from crnet_megatron.diagnostics.comm_probe import measure_layer_comm
    from crnet_megatron.parallel.groups import init_distributed

    init_distributed(tensor_model_parallel_size=world)
    return measure_layer_comm(**SHAPE, tp=world, sequence_parallel=sp)


@pytest.mark.parametrize("sp", [False, True], ids=["tp2", "tp2-sp"])
def test_measured_communication_equals_the_formula(sp):
    from crnet_megatron.analysis.counting import (
        comm_wire_bytes,
        layer_collective_calls,
        tp_layer_comm,
    )

    results = run_distributed(_worker, 2, sp, timeout=300)
    tokens = SHAPE["seq"] * SHAPE["batch"]
    for name, rank in (("dense", None), ("crnet", SHAPE["rank"])):
        expected = tp_layer_comm(SHAPE["hidden"], rank, 2, sp, tokens)
        for res in results:
            assert res[name]["elements"] == expected, name
            assert res[name]["wire_bytes"] == comm_wire_bytes(expected, 2, 4)
            assert res[name]["calls"] == layer_collective_calls(sp, dense=rank is None), name
        # the smallest CR-Net collective carries the r-wide codes of a sequence shard
        assert results[0]["crnet"]["smallest"] >= SHAPE["rank"] * tokens // 2
    # the CR-Net layer sends less than the dense one at this shape (r = h / 4)
    assert results[0]["crnet"]["wire_bytes"] < results[0]["dense"]["wire_bytes"]
