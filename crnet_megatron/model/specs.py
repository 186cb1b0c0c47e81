"""Megatron-Core ``ModuleSpec``s for a CR-Net LLaMA: dense layers first, CR-Net layers after.

``get_crnet_layer_spec`` gives one layer (its rank comes from the config: uniform, per-layer
list or a named schedule); ``get_crnet_decoder_block_spec`` builds the list for all layers and
slices it for the current pipeline stage with Megatron's own offset rules, as
``get_gpt_decoder_block_spec`` does for dense/MoE layers.

Backends: "local" runs anywhere (Megatron's parallel linears, ``torch.nn.RMSNorm``, SDPA core
attention). "te" uses Transformer Engine where it is importable: fused norm+linear and TE
linears for the dense layers, TE norms and TE core attention everywhere; the CR-Net A/B factors
stay Megatron parallel linears (they are r-wide and carry the chain add).

One checkpoint format for both backends: the TE dense layers keep their norms inside the fused
norm+linear (``...linear_qkv.layer_norm_weight``); the local dense layers save and load their
separate norms under those same keys (``TE_NORM_KEYS``, Megatron's ``sharded_state_dict_keys_map``
as in its local GPT spec), so a checkpoint moves between a TE GPU node and a CPU either way.
"""

from __future__ import annotations

import functools
from typing import List, Optional

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_layer import (
    TransformerLayerSubmodules,
    get_transformer_layer_offset,
)

from crnet_megatron.model.attention import CRNetSelfAttention, SDPACoreAttention
from crnet_megatron.model.config import CRNetConfig
from crnet_megatron.model.layer import CRNetTransformerLayer
from crnet_megatron.model.linears import (
    CRNetColumnParallelLinear,
    CRNetRowParallelLinear,
)
from crnet_megatron.model.mlp import CRNetMLP


class RMSNorm(torch.nn.RMSNorm):
    """Device-agnostic RMSNorm built from a config; under sequence parallel its weight sees a
    sequence shard, so it is marked for Megatron's TP grad all-reduce (``finalize_model_grads``)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-6, **unused):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        self.weight.sequence_parallel = bool(config.sequence_parallel)


def te_available() -> bool:
    try:
        import transformer_engine  # noqa: F401

        return torch.cuda.is_available()
    except Exception:
        return False


def _backend_modules(backend: str):
    if backend == "te":
        from megatron.core.extensions.transformer_engine import (
            TEDotProductAttention,
            TELayerNormColumnParallelLinear,
            TENorm,
            TERowParallelLinear,
        )

        return dict(norm=TENorm, core_attention=TEDotProductAttention,
                    dense_column_fused_norm=TELayerNormColumnParallelLinear,
                    dense_row=TERowParallelLinear)
    if backend == "local":
        return dict(norm=RMSNorm, core_attention=SDPACoreAttention,
                    dense_column_fused_norm=None, dense_row=RowParallelLinear)
    raise ValueError(f"backend={backend!r}: expected 'local' or 'te'")


# local dense layer norm -> the TE fused norm+linear's key (checkpoints only)
TE_NORM_KEYS = {"input_layernorm.": "self_attention.linear_qkv.layer_norm_",
                "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}


def get_crnet_layer_spec(config: CRNetConfig, layer_number: int,
                         backend: str = "local") -> ModuleSpec:
    """Spec of global layer ``layer_number`` (1-based): dense when it seeds the chains."""
    m = _backend_modules(backend)
    rank = config.rank_of_layer(layer_number)
    keys_map = {}
    if rank is None:
        fused = m["dense_column_fused_norm"]
        norm = IdentityOp if fused else m["norm"]
        qkv = fc1 = fused or ColumnParallelLinear
        proj = fc2 = m["dense_row"]
        keys_map = {} if fused else dict(TE_NORM_KEYS)
    else:
        norm = m["norm"]
        qkv = functools.partial(CRNetColumnParallelLinear, rank=rank, layout="qkv")
        fc1 = ModuleSpec(module=CRNetColumnParallelLinear, params={"rank": rank, "layout": "glu"})
        proj = fc2 = ModuleSpec(module=CRNetRowParallelLinear, params={"rank": rank})
    return ModuleSpec(
        module=CRNetTransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=CRNetSelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=qkv, core_attention=m["core_attention"], linear_proj=proj)),
            pre_mlp_layernorm=norm,
            mlp=ModuleSpec(module=CRNetMLP,
                           submodules=MLPSubmodules(linear_fc1=fc1, linear_fc2=fc2)),
            sharded_state_dict_keys_map=keys_map,
        ),
    )


def get_crnet_decoder_block_spec(config: CRNetConfig, backend: Optional[str] = None,
                                 vp_stage: Optional[int] = None,
                                 pp_rank: Optional[int] = None) -> TransformerBlockSubmodules:
    """Specs of this pipeline stage's layers, sliced from the full per-layer list."""
    backend = backend or ("te" if te_available() else "local")
    all_specs: List[ModuleSpec] = [
        get_crnet_layer_spec(config, n, backend) for n in range(1, config.num_layers + 1)]
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
    count = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return TransformerBlockSubmodules(layer_specs=all_specs[offset:offset + count],
                                      layer_norm=_backend_modules(backend)["norm"])
