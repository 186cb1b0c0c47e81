"""A pre-norm LLaMA layer that takes the four incoming chains and returns the four outgoing ones.

Chains are the outputs of the fused projections (``linear_qkv``, ``linear_proj``,
``linear_fc1``, ``linear_fc2``) in their TP layout: qkv/fc1 sharded on the output dimension,
proj/fc2 in the residual stream's layout. A dense layer ignores incoming chains and seeds new
ones with its outputs; a CR-Net layer adds ``s(beta) * chain`` to each projection. The lowrank
and dense baselines hand no chains on (``None``).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_layer import TransformerLayer

from crnet_megatron.model.projection import active_scheme


class Chains(NamedTuple):
    """The per-position chains between consecutive layers (7 positions in 4 fused tensors)."""

    qkv: torch.Tensor
    proj: torch.Tensor
    fc1: torch.Tensor
    fc2: torch.Tensor


class CRNetTransformerLayer(TransformerLayer):
    """Megatron TransformerLayer construction with an explicit-chain ``forward``.

    Megatron's ``selective`` recompute modules are honoured (outside a CR-Net recompute scheme,
    which replays whole layers): ``core_attn`` in attention, ``mlp`` (the SwiGLU MLP is
    recomputed from its input; its chains are checkpoint outputs) and ``layernorm`` (each norm's
    output is dropped after the block that reads it and recomputed in backward, Megatron's
    ``CheckpointWithoutOutput``)."""

    def __init__(self, config, submodules, *args, **kwargs):
        # Megatron's layer passes ``tp_group`` only to a spec whose module *is* ``MLP``; the
        # CR-Net MLP (a subclass) is built here with the same kwargs instead
        mlp_spec = submodules.mlp
        super().__init__(config, dataclasses.replace(submodules, mlp=IdentityOp), *args, **kwargs)
        self.submodules_config = submodules
        self.mlp = build_module(mlp_spec, config=self.config, tp_group=self.pg_collection.tp)
        if hasattr(self.mlp, "set_layer_number"):
            self.mlp.set_layer_number(self.layer_number)

    def _recomputes(self, module: str) -> bool:
        c = self.config
        return (c.recompute_granularity == "selective" and module in (c.recompute_modules or ())
                and self.training and torch.is_grad_enabled() and active_scheme() is None)

    def _norm(self, norm, x):
        """(normed x, its checkpoint or None): the output is dropped later if recomputed."""
        if not self._recomputes("layernorm") or isinstance(norm, IdentityOp):
            return norm(x), None
        ckpt = tensor_parallel.CheckpointWithoutOutput(fp8=self.config.fp8)  # None: no FP8
        return ckpt.checkpoint(norm, x), ckpt

    def _mlp(self, x, chains):
        if not self._recomputes("mlp"):
            return self.mlp(x, chains=chains)

        def run(x_, *chains_):
            out, (fc1, fc2) = self.mlp(x_, chains=chains_ or None)
            return out, fc1, fc2

        out, fc1, fc2 = tensor_parallel.checkpoint(run, False, x, *(chains or ()))
        return out, (fc1, fc2)

    def forward(self, hidden_states: torch.Tensor, chains: Optional[Chains] = None,
                rotary_pos_emb=None, **unused):
        x, norm_ckpt = self._norm(self.input_layernorm, hidden_states)
        attn_out, (qkv, proj) = self.self_attention(
            x, rotary_pos_emb=rotary_pos_emb,
            chains=None if chains is None else (chains.qkv, chains.proj))
        if norm_ckpt is not None:
            norm_ckpt.discard_output_and_register_recompute(attn_out)
        hidden_states = hidden_states + attn_out
        x, norm_ckpt = self._norm(self.pre_mlp_layernorm, hidden_states)
        mlp_out, (fc1, fc2) = self._mlp(x, None if chains is None else (chains.fc1, chains.fc2))
        if norm_ckpt is not None:
            norm_ckpt.discard_output_and_register_recompute(mlp_out)
        if not self.config.carries_chains:  # lowrank/dense baselines: no cross-layer term
            return hidden_states + mlp_out, None
        return hidden_states + mlp_out, Chains(qkv, proj, fc1, fc2)
