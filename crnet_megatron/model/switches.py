"""Which Megatron ``TransformerConfig`` switches a CR-Net model honours: an allowlist.

The CR-Net layers, block and projections replace Megatron's forwards, so a switch those forwards
would have read (a fusion, another norm, sliding-window attention, MoE, MLA, FP8, ...) would be
silently ignored, and the Transformer Engine and local backends would then train different
models from one config. Every field not listed in ``HONOURED`` must therefore keep
``CRNetConfig``'s default; any other value is refused with one line naming the field. A new
megatron-core field is refused until it is listed here (``tests/test_config_errors.py`` walks
every field).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

# honoured at any value: the shape, the parallel layout and the schedule's P2P settings (read by
# Megatron's schedules, DDP and optimizer, and by the CR-Net modules), precision, recompute,
# initialisation, and the callbacks Megatron's DDP and optimizer set on the config
HONOURED = frozenset({
    "num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
    "kv_channels", "layernorm_epsilon", "init_method_std",
    "tensor_model_parallel_size", "pipeline_model_parallel_size",
    "virtual_pipeline_model_parallel_size", "sequence_parallel",
    "num_layers_in_first_pipeline_stage", "num_layers_in_last_pipeline_stage",
    "pipeline_dtype", "overlap_p2p_comm", "batch_p2p_comm", "batch_p2p_sync",
    "deallocate_pipeline_outputs",
    "bf16", "params_dtype", "perform_initialization", "use_cpu_initialization",
    "recompute_granularity", "recompute_method", "recompute_num_layers", "recompute_modules",
    "timers", "finalize_model_grads_func", "grad_scale_func", "no_sync_func", "grad_sync_func",
    "param_sync_func", "barrier_with_L1_time", "config_logger_dir",
})

# why some refused switches are refused (the others: the CR-Net forwards do not read them)
REASONS = {
    "fp8": "FP8 is not supported: the CR-Net block's forward does not enter Transformer Engine's "
           "FP8 autocast and the A/B factors are Megatron linears; use None (bf16)",
    "cuda_graph_impl": "CUDA graphs are not supported: the CR-Net layers do not go through "
                       "Megatron's graphed forward; use 'none'",
    "context_parallel_size": "context parallelism is not supported (the core attention and the "
                             "chains hold whole sequences); use 1",
    "pipeline_model_parallel_layout": "an explicit layout is not supported: stages are cut by "
                                      "Megatron's num_layers_in_first/last_pipeline_stage rule "
                                      "(model.stages); use None",
    "cpu_offloading": "activation offloading is not supported: the CR-Net block replaces the "
                      "forward that offloads; use False",
    "add_bias_linear": "CR-Net projections have no bias; set False",
    "hidden_dropout": "the model has no dropout; use 0",
    "attention_dropout": "the model has no dropout; use 0",
    "gated_linear_unit": "the LLaMA MLP is SwiGLU; set True",
}


def _default(field: dataclasses.Field):
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def _differs(value, default) -> bool:
    try:
        return bool(value != default)
    except Exception:  # noqa: BLE001 - a value that cannot even be compared is not the default
        return True


def unhonoured(config) -> Optional[Tuple[str, object, str]]:
    """(field, value, why) of the first field of ``config`` outside ``HONOURED`` that is not at
    its ``CRNetConfig`` default, or None. CR-Net's own ``crnet_*`` fields are all honoured."""
    for field in dataclasses.fields(config):
        if field.name in HONOURED or field.name.startswith("crnet_") or not field.init:
            continue
        default = _default(field)
        value = getattr(config, field.name)
        if default is not dataclasses.MISSING and _differs(value, default):
            why = REASONS.get(field.name, "the CR-Net forwards do not honour this Megatron "
                                          f"switch; leave it at its default {default!r}")
            return field.name, value, why
    return None
