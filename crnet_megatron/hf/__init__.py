"""A self-contained PyTorch CR-Net LLaMA (no Megatron import) for exported checkpoints."""

from .modeling_crnet import CRNetForCausalLM, CRNetLlamaConfig, KVCache  # noqa: F401
