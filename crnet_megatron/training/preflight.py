"""What a run checks before it starts, in one place: the layout's divisibility rules
(``model.rules``), the files it reads and the directory it writes, the batch split over DP,
and the cost of turning sequence parallel off. All before any process group or megatron-core
import, so ``crnet-train``, ``--dry-run`` and ``crnet-plan`` answer in about a second."""

from __future__ import annotations

import os
from typing import Any, Dict, Optional

from crnet_megatron.checkpoint.run_dir import RUN_FILES, check_save_entries
from crnet_megatron.config.run_config import parse_blend
from crnet_megatron.data.safe_files import check_target


def check_layout(cfg, world: Optional[int] = None) -> None:
    """Every divisibility rule a run checks (``model.rules``), before any process group: one
    line naming the rule that fails. ``world`` (the number of processes) adds the DP rules."""
    from crnet_megatron.model.rules import layout_problems

    m, p, s = cfg["model"], cfg["parallel"], cfg["schedule"]
    problems = layout_problems(
        heads=m["num_attention_heads"], groups=m["num_query_groups"], ffn=m["ffn_hidden_size"],
        layers=m["num_layers"], seq=m["seq_length"], tp=p["tensor_model_parallel_size"],
        pp=p["pipeline_model_parallel_size"], sequence_parallel=bool(p["sequence_parallel"]),
        first=p["num_layers_in_first_pipeline_stage"],
        last=p["num_layers_in_last_pipeline_stage"],
        vpp=p["virtual_pipeline_model_parallel_size"],
        world=world, micro_batch=s["micro_batch_size"], global_batch=s["global_batch_size"])
    if problems:
        raise ValueError(problems[0])


def check_inputs(cfg) -> None:
    """The files a run reads exist and its save directory can be written, before any import of
    megatron-core or process group."""
    from crnet_megatron.data.validate import tokenizer_file

    d, ck = cfg["data"], cfg["checkpoint"]
    if d["data_path"]:
        if not d["tokenizer"]:
            raise ValueError("data.tokenizer (a tokenizer.json or an HF tokenizer directory) is "
                             "required with data.data_path")
        for prefix in parse_blend(d["data_path"])[0]:
            for ext in (".bin", ".idx"):
                if not os.path.isfile(prefix + ext):
                    raise FileNotFoundError(f"data.data_path: {prefix + ext} does not exist "
                                            "(crnet-preprocess writes PREFIX.bin and PREFIX.idx)")
    if d["tokenizer"]:
        tokenizer_file(d["tokenizer"])
    if ck["load"] and not os.path.isdir(ck["load"]):
        raise FileNotFoundError(f"checkpoint.load={ck['load']!r} does not exist")
    if ck["save"]:
        existing = os.path.abspath(ck["save"])
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        if not os.access(existing, os.W_OK):
            raise PermissionError(f"checkpoint.save={ck['save']!r}: {existing} is not writable")
        for name, what in RUN_FILES.items():  # a received run directory may hold links
            check_target(os.path.join(ck["save"], name), f"{what} (checkpoint.save)")
        check_save_entries(ck["save"])


def validate_batch(cfg, dp_size: int) -> int:
    """Number of micro-batches per step; global batch must split over DP and micro-batches."""
    s = cfg["schedule"]
    per_step = s["micro_batch_size"] * dp_size
    if s["global_batch_size"] % per_step:
        raise ValueError(f"schedule.global_batch_size={s['global_batch_size']} is not divisible by "
                         f"micro_batch_size x data_parallel_size = {per_step}")
    from crnet_megatron.model.rules import interleaving_problem

    micro, p = s["global_batch_size"] // per_step, cfg["parallel"]
    problem = interleaving_problem(micro, p["pipeline_model_parallel_size"],
                                   p["virtual_pipeline_model_parallel_size"])
    if problem:
        raise ValueError(problem)
    return micro


def sequence_parallel_warning(cfg: Dict[str, Dict[str, Any]]) -> Optional[str]:
    """For CR-Net/lowrank at TP > 1 with sequence parallel turned off: what it costs, in forward
    GEMM FLOPs per layer and micro-batch on one rank (the planner's count)."""
    p, m, s = cfg["parallel"], cfg["model"], cfg["schedule"]
    tp = p["tensor_model_parallel_size"]
    if p["sequence_parallel"] or tp == 1 or m["variant"] not in ("crnet", "lowrank"):
        return None
    from crnet_megatron.analysis.counting import ModelShape
    from crnet_megatron.planner.per_rank import Plan
    from crnet_megatron.planner.step_time import layer_gemm_flops

    rank = m["crnet_rank"] if isinstance(m["crnet_rank"], int) else max(m["crnet_rank"])
    shape = ModelShape(hidden=m["hidden_size"], ffn=m["ffn_hidden_size"],
                       heads=m["num_attention_heads"], layers=m["num_layers"], vocab=1,
                       groups=m["num_query_groups"], head_dim=m["kv_channels"],
                       variant=m["variant"])
    flops = {sp: layer_gemm_flops(Plan(shape, rank, m["seq_length"], tp=tp,
                                       micro_batch=s["micro_batch_size"],
                                       sequence_parallel=sp), rank) for sp in (False, True)}
    return (f"warning: parallel.sequence_parallel is false at tensor_model_parallel_size={tp}: "
            f"each rank runs the column A factors on every token, {flops[False] / 1e9:.3g} "
            f"GFLOP of forward GEMM per CR-Net layer and micro-batch instead of "
            f"{flops[True] / 1e9:.3g} with sequence parallel ({flops[False] / flops[True]:.2f}x); "
            "remove the key (on by default) unless this is what you want")
