"""CR-Net (cross-layer low-rank LLaMA) on Megatron-Core."""

from .config import CRNetConfig
from .layer import Chains
from .model import CRNetGPTModel, build_model
from .specs import get_crnet_decoder_block_spec, get_crnet_layer_spec

__all__ = ["CRNetConfig", "Chains", "CRNetGPTModel", "build_model",
           "get_crnet_decoder_block_spec", "get_crnet_layer_spec"]
