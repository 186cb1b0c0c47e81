"""The divisibility rules of a parallel layout, stated once (no torch): the run config checks a
run against them before any process group (``crnet-train``, ``--dry-run``), ``CRNetConfig``
checks itself against them, and the planner's layout search keeps only layouts that pass them.
Each broken rule is one line in the run config's key names (``transformer_config_names`` turns
it into ``CRNetConfig``'s)."""

from __future__ import annotations

import re
from typing import List, Optional

from crnet_megatron.model.stages import chunk_layers, stage_layers


def layout_problems(*, heads: int, groups: Optional[int], ffn: int, layers: int,
                    seq: Optional[int],
                    tp: int, pp: int, sequence_parallel: bool, first: Optional[int] = None,
                    last: Optional[int] = None, vpp: Optional[int] = None,
                    world: Optional[int] = None, micro_batch: int = 1,
                    global_batch: Optional[int] = None) -> List[str]:
    groups = groups or heads
    uneven = first is not None or last is not None
    tp_key, pp_key = "parallel.tensor_model_parallel_size", "parallel.pipeline_model_parallel_size"
    rules = [
        (heads % tp == 0, f"model.num_attention_heads = {heads} is not divisible by {tp_key} = "
                          f"{tp} (each rank holds whole heads)"),
        (groups % tp == 0, f"model.num_query_groups = {groups} is not divisible by {tp_key} = {tp}"),
        (heads % groups == 0, f"model.num_attention_heads = {heads} is not a multiple of "
                              f"model.num_query_groups = {groups}"),
        (ffn % tp == 0, f"model.ffn_hidden_size = {ffn} is not divisible by {tp_key} = {tp}"),
        (not sequence_parallel or seq is None or seq % tp == 0,
         f"model.seq_length = {seq} is not divisible by {tp_key} = {tp} (sequence parallel "
         "splits the sequence)"),
        (pp <= layers, f"{pp_key} = {pp} is more than model.num_layers = {layers}"),
        (pp == 1 or layers % pp == 0 or uneven,
         f"model.num_layers = {layers} is not divisible by {pp_key} = {pp} (or set "
         "parallel.num_layers_in_first/last_pipeline_stage)"),
        (not uneven or stage_layers(layers, pp, first, last) is not None,
         f"parallel.num_layers_in_first/last_pipeline_stage = {first}/{last} leave "
         f"model.num_layers = {layers} minus them unsplittable over the other stages of {pp_key} "
         f"= {pp}"),
        (vpp is None or pp > 1, f"parallel.virtual_pipeline_model_parallel_size = {vpp} needs "
                                f"{pp_key} >= 2"),
        (vpp is None or pp == 1 or stage_layers(layers, pp, first, last) is None
         or chunk_layers(layers, pp, vpp, first, last) is not None,
         f"the layers of each pipeline stage ({stage_layers(layers, pp, first, last)}) do not "
         f"split into parallel.virtual_pipeline_model_parallel_size = {vpp} equal model chunks"),
    ]
    if world is not None:
        rules.append((world % (tp * pp) == 0, f"{world} processes are not divisible by "
                      f"tensor_model_parallel_size x pipeline_model_parallel_size = {tp * pp}"))
        dp = max(1, world // (tp * pp))
        if global_batch is not None:
            rules.append((global_batch % (micro_batch * dp) == 0,
                          f"schedule.global_batch_size = {global_batch} is not divisible by "
                          f"schedule.micro_batch_size x data-parallel size = {micro_batch} x {dp}"))
            problem = interleaving_problem(global_batch // (micro_batch * dp), pp, vpp)
            rules.append((problem is None, problem))
    return [message for ok, message in rules if not ok]


def transformer_config_names(message: str) -> str:
    """A rule's line in ``CRNetConfig``'s field names (``model.num_layers`` ->
    ``CRNetConfig.num_layers``), for a config built through the Python API."""
    return re.sub(r"\b(?:model|parallel|schedule)\.(\w+)", r"CRNetConfig.\1", message)


def interleaving_problem(num_microbatches: int, pp: int, vpp: Optional[int]) -> Optional[str]:
    """Megatron's interleaved schedule runs the micro-batches in groups of ``pp`` per model
    chunk: their number must be a multiple of ``pp`` (None: fine)."""
    if vpp is None or num_microbatches % pp == 0:
        return None
    return (f"interleaving (parallel.virtual_pipeline_model_parallel_size = {vpp}) runs the "
            f"micro-batches in groups of parallel.pipeline_model_parallel_size = {pp}: "
            f"schedule.global_batch_size / (micro_batch_size x data-parallel size) = "
            f"{num_microbatches} must be a multiple of {pp}")
