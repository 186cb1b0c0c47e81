"""CRNetGPTModel: Megatron-Core's GPTModel (embedding, RoPE, output layer, loss) around the
CR-Net decoder block."""

from __future__ import annotations

from typing import Optional

from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from crnet_megatron.model.block import CRNetTransformerBlock
from crnet_megatron.model.config import CRNetConfig


class CRNetGPTModel(GPTModel):
    """LLaMA-2-style GPT (RoPE, untied output layer) whose decoder threads CR-Net chains.

    GPTModel builds a ``TransformerBlock`` itself; it is given an empty block here and the
    decoder is then built once as a ``CRNetTransformerBlock`` from the same Megatron spec.
    """

    def __init__(self, config: CRNetConfig, block_spec: TransformerBlockSubmodules,
                 vocab_size: int, max_sequence_length: int, pre_process: bool = True,
                 post_process: bool = True, vp_stage: Optional[int] = None,
                 rotary_base: int = 10000, **kwargs):
        empty = TransformerBlockSubmodules(layer_specs=[], layer_norm=block_spec.layer_norm)
        super().__init__(
            config=config, transformer_layer_spec=empty, vocab_size=vocab_size,
            max_sequence_length=max_sequence_length, pre_process=pre_process,
            post_process=post_process, share_embeddings_and_output_weights=False,
            position_embedding_type="rope", rotary_base=rotary_base, vp_stage=vp_stage, **kwargs)
        self.decoder = CRNetTransformerBlock(
            config=config, spec=block_spec, pre_process=pre_process, post_process=post_process,
            pg_collection=self.pg_collection, vp_stage=vp_stage)

