"""The planner's pipeline model against real pipeline stages: per-stage parameters and the
payload at PP=2, the stage tensors held for backward, the micro-batches in flight under 1F1B
and the interleaved schedule (to the byte), and the interleaved bubble, boundaries and uneven
stages in the step model and the layout search."""

import pytest

from crnet_megatron.analysis.counting import LLAMA_SHAPES, ModelShape
from crnet_megatron.planner.per_rank import Plan, stage_params
from tests.helpers import run_distributed


def _pp_worker(rank, world, projection):
    from crnet_megatron import CRNetConfig, build_model
    from crnet_megatron.parallel.groups import init_distributed

    init_distributed(pipeline_model_parallel_size=world)
    config = CRNetConfig(num_layers=4, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
                         num_query_groups=2, crnet_rank=16, crnet_variant=projection,
                         pipeline_model_parallel_size=world, use_cpu_initialization=True)
    model = build_model(config, vocab_size=256, max_sequence_length=16, seed=1)
    return sum(p.numel() for p in model.parameters()), config.payload_width


@pytest.mark.parametrize("projection", ["crnet", "lowrank"])
def test_pp2_stage_params_and_payload(projection):
    from crnet_megatron import CRNetConfig
    from crnet_megatron.planner.memory import payload_elements_per_token

    results = run_distributed(_pp_worker, 2, projection, timeout=300)
    config = CRNetConfig(num_layers=4, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
                         num_query_groups=2, crnet_rank=16, crnet_variant=projection,
                         use_cpu_initialization=True)
    plan = Plan(ModelShape.from_config(config, 256), config.crnet_layer_ranks, 16, pp=2)
    for stage, (params, width) in enumerate(results):
        assert params == stage_params(plan, stage)
        assert width == payload_elements_per_token(plan)


def _pp_held_worker(rank, world, dealloc):
    """Peak bytes of stage-boundary tensors this stage holds for backward during one 1F1B step
    (4 micro-batches): its received inputs and its sent outputs, storages counted once."""
    from megatron.core.pipeline_parallel import schedules

    from crnet_megatron import CRNetConfig, build_model
    from crnet_megatron.parallel.groups import init_distributed
    from crnet_megatron.parallel.pipeline import forward_backward
    from tests.helpers import batch

    init_distributed(pipeline_model_parallel_size=world)
    config = CRNetConfig(num_layers=4, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
                         num_query_groups=2, crnet_rank=16, pipeline_model_parallel_size=world,
                         use_cpu_initialization=True, deallocate_pipeline_outputs=dealloc)
    model = build_model(config, vocab_size=256, max_sequence_length=16, seed=1)
    live, peak = {}, [0]
    first = lambda t: t[0] if isinstance(t, list) else t  # noqa: E731

    def measure():
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                    for pair in live.values() for t in pair if t is not None}
        peak[0] = max(peak[0], sum(storages.values()))

    real_fwd, real_bwd, real_free = (schedules.forward_step, schedules.backward_step,
                                     schedules.deallocate_output_tensor)

    def forward_step(*args, **kwargs):
        out, n = real_fwd(*args, **kwargs)
        inp = kwargs.get("input_tensor", args[4] if len(args) > 4 else None)
        live[id(first(out))] = (first(inp), first(out) if first(out).dim() else None)
        return out, n

    def deallocate(out, *a, **k):
        real_free(out, *a, **k)
        measure()

    def backward_step(input_tensor, output_tensor, *a, **k):
        measure()
        live.pop(id(first(output_tensor)), None)
        return real_bwd(input_tensor, output_tensor, *a, **k)

    schedules.forward_step, schedules.backward_step = forward_step, backward_step
    schedules.deallocate_output_tensor = deallocate
    data = iter([dict(zip(("tokens", "position_ids", "labels"), batch(seed)))
                 for seed in range(4)])

    def step(data_iterator, model):
        b = next(data_iterator)
        out = model(b["tokens"], b["position_ids"], None, labels=b["labels"])
        return out, lambda o: (o.float().mean(), {})

    forward_backward(forward_step_func=step, data_iterator=data, model=model,
                     num_microbatches=4, seq_length=16, micro_batch_size=2)
    return peak[0]


@pytest.mark.parametrize("dealloc", [True, False], ids=["deallocated", "kept"])
def test_pp2_held_stage_tensors_equal_the_planner(dealloc):
    """The planner counts the received inputs of the micro-batches in flight (1F1B: PP - stage)
    on every stage but the first, and no sent outputs (``deallocate_pipeline_outputs``, on by
    default): measured at PP=2 with 4 micro-batches, to the byte (a 1-element placeholder per
    deallocated output aside). Kept outputs would add one payload per micro-batch in flight."""
    from crnet_megatron import CRNetConfig
    from crnet_megatron.planner.memory import (
        payload_elements_per_token,
        pipeline_held_bytes,
    )

    held = run_distributed(_pp_held_worker, 2, dealloc, timeout=300)
    config = CRNetConfig(num_layers=4, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
                         num_query_groups=2, crnet_rank=16, use_cpu_initialization=True)
    plan = Plan(ModelShape.from_config(config, 256), config.crnet_layer_ranks, 16, pp=2,
                micro_batch=2, global_batch=8, bf16=False)
    payload = payload_elements_per_token(plan) * 16 * 2 * 4
    kept = [0 if dealloc else payload * min(2 - stage, 4) for stage in range(2)]
    kept[1] = 0  # the last stage sends nothing
    for stage in range(2):
        predicted = pipeline_held_bytes(plan, stage) + kept[stage]
        assert abs(held[stage] - predicted) <= 4 * 4, (stage, held, predicted)


def _in_flight_worker(rank, world, vpp, microbatches):
    """Peak chunk-micro-batches this rank holds (forward done, backward not) during one step,
    and the peak bytes of the stage inputs it received for them."""
    from megatron.core.pipeline_parallel import schedules

    from crnet_megatron import CRNetConfig
    from crnet_megatron.parallel.build import build_model_chunks
    from crnet_megatron.parallel.groups import init_distributed
    from crnet_megatron.parallel.pipeline import forward_backward
    from tests.helpers import batch

    init_distributed(pipeline_model_parallel_size=world, virtual_pipeline_model_parallel_size=vpp)
    config = CRNetConfig(num_layers=8, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
                         num_query_groups=2, crnet_rank=16, pipeline_model_parallel_size=world,
                         virtual_pipeline_model_parallel_size=vpp, use_cpu_initialization=True)
    chunks = build_model_chunks(config, vocab_size=256, max_sequence_length=16, seed=1)
    live, peak = {}, [0, 0]
    first = lambda t: t[0] if isinstance(t, list) else t  # noqa: E731
    real_fwd, real_bwd = schedules.forward_step, schedules.backward_step

    def forward_step(*args, **kwargs):
        out, n = real_fwd(*args, **kwargs)
        inp = first(kwargs.get("input_tensor", args[4] if len(args) > 4 else None))
        live[id(first(out))] = inp.numel() * inp.element_size() if inp is not None else 0
        peak[:] = max(peak[0], len(live)), max(peak[1], sum(live.values()))
        return out, n

    def backward_step(input_tensor, output_tensor, *a, **k):
        live.pop(id(first(output_tensor)), None)
        return real_bwd(input_tensor, output_tensor, *a, **k)

    schedules.forward_step, schedules.backward_step = forward_step, backward_step
    data = iter([dict(zip(("tokens", "position_ids", "labels"), batch(seed)))
                 for seed in range(microbatches)])

    def step(data_iterator, model):
        if not (model.pre_process or model.post_process):
            return model(None, None, None), lambda o: (o, {})
        b = next(data_iterator)
        out = model(b["tokens"], b["position_ids"], None, labels=b["labels"])
        return out, lambda o: (o.float().mean(), {})

    forward_backward(forward_step_func=step, data_iterator=data, model=chunks,
                     num_microbatches=microbatches, seq_length=16, micro_batch_size=2)
    return peak


@pytest.mark.parametrize("vpp", [None, 2], ids=["1f1b", "interleaved"])
def test_pp2_in_flight_micro_batches_equal_the_planner(vpp):
    """The planner's in-flight count (1F1B: PP - stage; interleaved: Megatron's warm-up + 1,
    in chunk-micro-batches) and the stage inputs held for them, against one PP=2 step with 4
    micro-batches of 8 layers, counted at every forward, to the byte."""
    from crnet_megatron import CRNetConfig
    from crnet_megatron.planner.memory import in_flight_chunks, pipeline_held_bytes

    got = run_distributed(_in_flight_worker, 2, vpp, 4, timeout=300)
    config = CRNetConfig(num_layers=8, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
                         num_query_groups=2, crnet_rank=16, use_cpu_initialization=True)
    plan = Plan(ModelShape.from_config(config, 256), config.crnet_layer_ranks, 16, pp=2,
                vpp=vpp, micro_batch=2, global_batch=8, bf16=False)
    assert [g[0] for g in got] == [in_flight_chunks(plan, s) for s in range(2)]
    assert [g[1] for g in got] == [pipeline_held_bytes(plan, s) for s in range(2)]
    assert got[0][0] == (5 if vpp else 2)  # the interleaved warm-up holds more


def test_interleaving_and_uneven_stages_in_the_step_model_and_the_search():
    """7B at PP=8 with 8 micro-batches: interleaving cuts the bubble from (PP-1)/(M+PP-1) to
    (PP-1)/(vM+PP-1) at the price of v boundaries per micro-batch, holds more chunk-micro-
    batches in flight, and first/last stages a layer lighter unload the ranks that also hold
    the embedding and the output layer; the search proposes them when they are fastest."""
    from dataclasses import replace

    from crnet_megatron.planner.hardware import get_gpu
    from crnet_megatron.planner.memory import in_flight_chunks
    from crnet_megatron.planner.search import search, valid
    from crnet_megatron.planner.step_time import step_time

    gpu = get_gpu("h100-80gb")
    plan = Plan(LLAMA_SHAPES["7b"], 512, 4096, pp=8, global_batch=8, recompute="crnet")
    plain, inter = step_time(plan, gpu), step_time(replace(plan, vpp=4), gpu)
    assert plain["bubble_fraction"] == pytest.approx(7 / 15)
    assert inter["bubble_fraction"] == pytest.approx(7 / 39)
    assert inter["bubble_s"] < plain["bubble_s"] / 3  # /4, less the 4x boundaries' share
    assert inter["p2p_s"] == pytest.approx(plain["p2p_s"] * 39 / 15)  # v M + PP - 1 boundaries
    assert inter["step_s"] < plain["step_s"]
    more = replace(plan, global_batch=16)  # 2 (PP - 1) + (v - 1) PP + 1 = 39 chunks of 1/4
    assert in_flight_chunks(replace(more, vpp=4), 0) / 4 == 9.75 > in_flight_chunks(more, 0) == 8
    # 32 layers at PP=8: first = last = 3 leave 26 for 6 stages, which do not split
    assert not valid(replace(plan, first_stage_layers=3, last_stage_layers=3), 8)
    uneven = replace(plan, pp=4, global_batch=4, first_stage_layers=7, last_stage_layers=7)
    assert uneven.chunks(1) == [list(range(7, 16))] and valid(uneven, 4)
    even = replace(uneven, first_stage_layers=None, last_stage_layers=None)
    assert step_time(uneven, gpu)["step_s"] < step_time(even, gpu)["step_s"]
    best = search(replace(plan, pp=1, global_batch=64), gpu, 64, top=200)
    assert any(b["plan"].vpp for b in best) and any(b["plan"].last_stage_layers for b in best)
