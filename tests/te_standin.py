"""A CPU stand-in for the Transformer Engine backend's parameter names (TE needs CUDA).

``TELayerNormColumnParallelLinearStandIn`` is a Megatron ``ColumnParallelLinear`` that holds
its RMSNorm weight as ``layer_norm_weight`` and normalises its input first, exactly as TE's
fused ``TELayerNormColumnParallelLinear`` names and computes it. ``te_backend_modules`` is the
"te" backend of ``model.specs`` with that module in the dense layers (and the local norms and
core attention elsewhere), so a model built with it checkpoints under the TE spec's keys.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

from crnet_megatron.model.attention import SDPACoreAttention
from crnet_megatron.model.specs import RMSNorm


class TELayerNormColumnParallelLinearStandIn(ColumnParallelLinear):
    def __init__(self, input_size, output_size, *, config, **kwargs):
        super().__init__(input_size, output_size, config=config, **kwargs)
        self.eps = config.layernorm_epsilon
        self.layer_norm_weight = torch.nn.Parameter(torch.ones(
            input_size, dtype=config.params_dtype,
            device="cpu" if config.use_cpu_initialization else torch.cuda.current_device()))
        self.layer_norm_weight.sequence_parallel = bool(config.sequence_parallel)

    def forward(self, x, *args, **kwargs):
        x = torch.nn.functional.rms_norm(x, (x.shape[-1],), self.layer_norm_weight, self.eps)
        return super().forward(x, *args, **kwargs)


def te_backend_modules():
    return dict(norm=RMSNorm, core_attention=SDPACoreAttention,
                dense_column_fused_norm=TELayerNormColumnParallelLinearStandIn,
                dense_row=RowParallelLinear)
