"""Building this rank's part of the model: its pipeline stage and TP shards, on its device,
with how the stage runs attached (as torchtitan's ``parallelize`` applies activation
checkpointing and pipelining to a model that knows nothing of them).

``parallelize`` gives the decoder block its stage payload (``pipeline.StagePayload``: how chains
cross a stage boundary) and its layer runner (``recompute.layer_runner``: Algorithm 1, Megatron
``full``, or none).
"""

from __future__ import annotations

from typing import List, Optional

import torch
from megatron.core import parallel_state

from crnet_megatron.model.config import CRNetConfig
from crnet_megatron.model.gpt import CRNetGPTModel
from crnet_megatron.model.init import init_weights
from crnet_megatron.model.specs import get_crnet_decoder_block_spec
from crnet_megatron.parallel.pipeline import StagePayload
from crnet_megatron.parallel.recompute import layer_runner


def parallelize(model: CRNetGPTModel, config: CRNetConfig) -> CRNetGPTModel:
    """Attach the stage payload and the recompute scheme to the decoder block."""
    model.decoder.stage_payload = StagePayload(config)
    model.decoder.layer_runner = layer_runner(config)
    return model


def build_model(config: CRNetConfig, vocab_size: int, max_sequence_length: int,
                backend: Optional[str] = None, vp_stage: Optional[int] = None,
                rotary_base: int = 10000, seed: Optional[int] = None,
                device: Optional[str] = None) -> CRNetGPTModel:
    """Build this rank's part of the model (its pipeline stage, or with ``vp_stage`` that
    stage's model chunk; its TP shards) on its device.

    With ``seed``, the weights are drawn layout-invariantly (``init.init_weights``): the same
    model at every TP x PP; without it, as Megatron draws them. ``device="cpu"`` keeps it in
    host memory where a GPU is visible (the exporter's choice)."""
    virtual = vp_stage is not None
    pre = parallel_state.is_pipeline_first_stage(ignore_virtual=not virtual, vp_stage=vp_stage)
    post = parallel_state.is_pipeline_last_stage(ignore_virtual=not virtual, vp_stage=vp_stage)
    spec = get_crnet_decoder_block_spec(config, backend=backend, vp_stage=vp_stage)
    model = CRNetGPTModel(config, spec, vocab_size, max_sequence_length, pre_process=pre,
                          post_process=post, vp_stage=vp_stage, rotary_base=rotary_base)
    parallelize(model, config)
    if device != "cpu" and torch.cuda.is_available():
        model = model.cuda()
    if seed is not None:
        init_weights(model, config, seed)
    if config.bf16:
        model = model.to(torch.bfloat16)
    return model


def build_model_chunks(config: CRNetConfig, vocab_size: int, max_sequence_length: int,
                       **kwargs) -> List[CRNetGPTModel]:
    """This rank's model chunks, in Megatron's order: one per virtual pipeline stage under
    interleaving (chunk ``i`` holds the ``i``-th slice of the rank's layers in the global
    order), else one."""
    vpp = config.virtual_pipeline_model_parallel_size
    stages = range(vpp) if vpp is not None else [None]
    return [build_model(config, vocab_size, max_sequence_length, vp_stage=v, **kwargs)
            for v in stages]
