"""The decoder block: where the CR-Net chains enter and leave.

Chains enter at the stage's first layer (``None`` on the first stage, whose dense layer 1 seeds
them; unpacked from the previous stage's P2P tensor otherwise) and leave at its last layer
(packed with the residual stream for the next stage; dropped after the last stage).
``run_layers`` is the whole threading: a pipeline stage or a recompute scheme needs exactly its
inputs and outputs. How chains cross a stage boundary (``stage_payload``) and how the layers run
in training (``layer_runner``: a recompute scheme) are attached by the parallel wing
(``parallel.build.parallelize``), so the model knows nothing of either.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.utils import WrappedTensor

from crnet_megatron.model.layer import Chains


class CRNetTransformerBlock(TransformerBlock):
    """Megatron TransformerBlock construction (layer specs, PP slicing, final norm)."""

    # set by parallel.build.parallelize: pack/unpack at stage boundaries, and the recompute
    # scheme, a callable (layers, hidden, chains, rope, config) -> (hidden, chains)
    stage_payload = None
    layer_runner: Optional[Callable] = None

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
        if not (self.pre_process and self.post_process) and self.stage_payload is None:
            raise RuntimeError("a pipeline stage needs its stage payload: build the model with "
                               "crnet_megatron.parallel.build.build_model")
        if not self.pre_process:  # chains enter from the previous pipeline stage
            hidden_states, chains = self.stage_payload.unpack(self.input_tensor)
        if self.layer_runner is not None and self.training and torch.is_grad_enabled():
            hidden_states, chains = self.layer_runner(self.layers, hidden_states, chains,
                                                      rotary_pos_emb, self.config)
        else:
            hidden_states, chains = self.run_layers(hidden_states, chains, rotary_pos_emb)
        if not self.post_process:  # chains leave for the next pipeline stage
            return self.stage_payload.pack(hidden_states, chains)
        if self.final_layernorm is not None:
            hidden_states = self.final_layernorm(hidden_states)
        return hidden_states
