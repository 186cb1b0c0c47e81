"""SwiGLU MLP whose ``linear_fc1`` (gate | up) and ``linear_fc2`` (down) carry CR-Net chains."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from megatron.core.transformer.mlp import MLP

from crnet_megatron.model.linears import project


class CRNetMLP(MLP):
    """Megatron MLP construction; ``forward`` threads the fc1/fc2 chains explicitly."""

    def forward(self, hidden_states: torch.Tensor,
                chains: Optional[Tuple[torch.Tensor, torch.Tensor]] = None):
        fc1_prev, fc2_prev = chains if chains is not None else (None, None)
        intermediate = project(self.linear_fc1, hidden_states, fc1_prev)
        gate, up = torch.chunk(intermediate, 2, dim=-1)  # Megatron's per-rank [gate | up]
        output = project(self.linear_fc2, self.config.activation_func(gate) * up, fc2_prev)
        return output, (intermediate, output)
