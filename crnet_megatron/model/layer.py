"""A pre-norm LLaMA layer that takes the four incoming chains and returns the four outgoing ones.

Chains are the outputs of the fused projections (``linear_qkv``, ``linear_proj``,
``linear_fc1``, ``linear_fc2``) in their TP layout: qkv/fc1 sharded on the output dimension,
proj/fc2 in the residual stream's layout. A dense layer ignores incoming chains and seeds new
ones with its outputs; a CR-Net layer adds ``s(beta) * chain`` to each projection. The lowrank
and dense baselines hand no chains on (``None``).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from megatron.core.transformer.transformer_layer import TransformerLayer


class Chains(NamedTuple):
    """The per-position chains between consecutive layers (7 positions in 4 fused tensors)."""

    qkv: torch.Tensor
    proj: torch.Tensor
    fc1: torch.Tensor
    fc2: torch.Tensor


class CRNetTransformerLayer(TransformerLayer):
    """Megatron TransformerLayer construction with an explicit-chain ``forward``."""

    def forward(self, hidden_states: torch.Tensor, chains: Optional[Chains] = None,
                rotary_pos_emb=None, **unused):
        x = self.input_layernorm(hidden_states)
        attn_out, (qkv, proj) = self.self_attention(
            x, rotary_pos_emb=rotary_pos_emb,
            chains=None if chains is None else (chains.qkv, chains.proj))
        hidden_states = hidden_states + attn_out
        x = self.pre_mlp_layernorm(hidden_states)
        mlp_out, (fc1, fc2) = self.mlp(
            x, chains=None if chains is None else (chains.fc1, chains.fc2))
        if not self.config.carries_chains:  # lowrank/dense baselines: no cross-layer term
            return hidden_states + mlp_out, None
        return hidden_states + mlp_out, Chains(qkv, proj, fc1, fc2)
