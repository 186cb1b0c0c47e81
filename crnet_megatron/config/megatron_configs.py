"""A run config as Megatron-Core's configs: the model's ``CRNetConfig`` (a
``TransformerConfig``) and the ``OptimizerConfig``. Kept apart from ``run_config`` (the YAML
schema and its checks, no torch)."""

from __future__ import annotations


def to_crnet_config(cfg, params_dtype=None):
    """The CRNetConfig (a Megatron TransformerConfig) of a run."""
    import torch

    from crnet_megatron.model.config import CRNetConfig

    m, p, o, r = cfg["model"], cfg["parallel"], cfg["optimizer"], cfg["recompute"]
    bf16 = o["bf16"]
    return CRNetConfig(
        num_layers=m["num_layers"], hidden_size=m["hidden_size"],
        ffn_hidden_size=m["ffn_hidden_size"], num_attention_heads=m["num_attention_heads"],
        num_query_groups=m["num_query_groups"], kv_channels=m["kv_channels"],
        crnet_variant=m["variant"], crnet_learn_beta=m["crnet_learn_beta"],
        crnet_rank=m["crnet_rank"], crnet_rank_schedule=m["crnet_rank_schedule"],
        crnet_dense_layers=m["crnet_dense_layers"], crnet_beta_init=float(m["crnet_beta_init"]),
        crnet_eps=float(m["crnet_eps"]), crnet_lowrank_init=m["crnet_lowrank_init"],
        init_method_std=float(m["init_method_std"]),
        layernorm_epsilon=float(m["layernorm_epsilon"]),
        tensor_model_parallel_size=p["tensor_model_parallel_size"],
        pipeline_model_parallel_size=p["pipeline_model_parallel_size"],
        sequence_parallel=p["sequence_parallel"],
        num_layers_in_first_pipeline_stage=p["num_layers_in_first_pipeline_stage"],
        num_layers_in_last_pipeline_stage=p["num_layers_in_last_pipeline_stage"],
        virtual_pipeline_model_parallel_size=p["virtual_pipeline_model_parallel_size"],
        bf16=bf16, params_dtype=params_dtype or (torch.bfloat16 if bf16 else torch.float32),
        use_cpu_initialization=not torch.cuda.is_available(),
        recompute_granularity=r["recompute_granularity"], recompute_method=r["recompute_method"],
        recompute_num_layers=r["recompute_num_layers"],
        recompute_modules=r["recompute_modules"] or ["core_attn"],
        crnet_checkpoint_every=r["crnet_checkpoint_every"],
        crnet_recompute_min_scale=float(r["crnet_recompute_min_scale"]),
        crnet_recompute_max_ratio=r["crnet_recompute_max_ratio"],
    )


def use_distributed_optimizer(cfg) -> bool:
    """Megatron's distributed optimizer, on Apex/TE's Adam or, without them (CPU, or a GPU
    image without either), torch's Adam with its checkpoints mended (``parallel.compat``)."""
    return bool(cfg["parallel"]["use_distributed_optimizer"])


def to_optimizer_config(cfg, distributed: bool):
    import torch
    from megatron.core.optimizer import OptimizerConfig

    o = cfg["optimizer"]
    if o["optimizer"] not in ("adam", "sgd"):
        raise ValueError(f"optimizer.optimizer={o['optimizer']!r}: expected 'adam' or 'sgd'")
    return OptimizerConfig(
        optimizer=o["optimizer"], lr=float(o["lr"]), min_lr=float(o["min_lr"]),
        weight_decay=float(o["weight_decay"]), adam_beta1=float(o["adam_beta1"]),
        adam_beta2=float(o["adam_beta2"]), adam_eps=float(o["adam_eps"]),
        clip_grad=float(o["clip_grad"]), bf16=o["bf16"],
        params_dtype=torch.bfloat16 if o["bf16"] else torch.float32,
        use_distributed_optimizer=distributed,
        overlap_param_gather=distributed and cfg["parallel"]["overlap_param_gather"],
    )
