"""The decoder block: where the CR-Net chains enter and leave.

Chains enter at the stage's first layer (``None`` on the stage holding the dense layer 1, which
seeds them) and leave at its last layer. ``run_layers`` is the whole threading: a pipeline stage
or a recompute scheme needs exactly its inputs and outputs.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.utils import WrappedTensor

from .layer import Chains


class CRNetTransformerBlock(TransformerBlock):
    """Megatron TransformerBlock construction (layer specs, PP slicing, final norm)."""

    def run_layers(self, hidden_states: torch.Tensor, chains: Optional[Chains],
                   rotary_pos_emb=None) -> Tuple[torch.Tensor, Chains]:
        for layer in self.layers:
            hidden_states, chains = layer(hidden_states, chains, rotary_pos_emb=rotary_pos_emb)
        return hidden_states, chains

    def forward(self, hidden_states, attention_mask=None, rotary_pos_emb=None,
                inference_context=None, packed_seq_params=None, **unused):
        if inference_context is not None or packed_seq_params is not None:
            raise NotImplementedError("CR-Net block: inference contexts and packed sequences "
                                      "are not supported (training only)")
        if isinstance(hidden_states, WrappedTensor):
            hidden_states = hidden_states.unwrap()
        chains = None
        if not self.pre_process:
            hidden_states = self.input_tensor
        hidden_states, chains = self.run_layers(hidden_states, chains, rotary_pos_emb)
        if self.final_layernorm is not None:
            hidden_states = self.final_layernorm(hidden_states)
        return hidden_states
