"""The decoder block: where the CR-Net chains enter and leave.

Chains enter at the stage's first layer (``None`` on the first stage, whose dense layer 1 seeds
them; unpacked from the previous stage's P2P tensor otherwise) and leave at its last layer
(packed with the residual stream for the next stage; dropped after the last stage).
``run_layers`` is the whole threading: a pipeline stage or a recompute scheme needs exactly its
inputs and outputs.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.utils import WrappedTensor

from . import pipeline
from .layer import Chains
from .recompute import crnet_recompute, megatron_full_recompute


class CRNetTransformerBlock(TransformerBlock):
    """Megatron TransformerBlock construction (layer specs, PP slicing, final norm)."""

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        """Checkpoint keys per global layer: dense and CR-Net layers (and per-layer ranks) have
        different parameters, so they cannot be stacked along a layer axis."""
        metadata = dict(metadata or {}, non_homogeneous_layers=True)
        return super().sharded_state_dict(prefix, sharded_offsets, metadata)

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
        if not self.pre_process:  # chains enter from the previous pipeline stage
            hidden_states, chains = pipeline.unpack_stage_input(self.input_tensor, self.config)
        granularity = self.config.recompute_granularity
        if self.training and torch.is_grad_enabled() and granularity == "crnet":
            hidden_states, chains = crnet_recompute(self.layers, hidden_states, chains,
                                                    rotary_pos_emb, self.config)
        elif self.training and torch.is_grad_enabled() and granularity == "full":
            hidden_states, chains = megatron_full_recompute(self.layers, hidden_states, chains,
                                                            rotary_pos_emb, self.config)
        else:
            hidden_states, chains = self.run_layers(hidden_states, chains, rotary_pos_emb)
        if not self.post_process:  # chains leave for the next pipeline stage
            return pipeline.pack_stage_output(hidden_states, chains, self.config)
        if self.final_layernorm is not None:
            hidden_states = self.final_layernorm(hidden_states)
        return hidden_states
