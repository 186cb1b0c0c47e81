"""Self-attention whose projections carry CR-Net chains, and a device-agnostic core attention.

``CRNetSelfAttention`` reuses Megatron's ``SelfAttention`` construction (``linear_qkv``,
``core_attention``, ``linear_proj`` from the spec) and replaces only ``forward`` so the chain
inputs go in, and the chain outputs come out, explicitly. It splits the fused QKV output in
Megatron's GQA layout (``[ng, (np/ng + 2) * hn]`` per rank). RoPE is applied after the
projection, so the q/k chains run on pre-RoPE activations, as in the paper. Megatron's
``selective`` recompute of ``core_attn`` is honoured (``tensor_parallel.checkpoint``).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.module import MegatronModule

from crnet_megatron.model import positions
from crnet_megatron.model.linears import project
from crnet_megatron.model.projection import active_scheme


class SDPACoreAttention(MegatronModule):
    """Causal core attention on ``torch.nn.functional.scaled_dot_product_attention``.

    Runs on CPU and GPU alike (no fused-kernel or CUDA buffer requirements); GQA is handled by
    SDPA's ``enable_gqa``. Signature-compatible with Megatron's core attention modules.
    """

    def __init__(self, config, layer_number: int = 1, attn_mask_type=None, attention_type=None,
                 softmax_scale: Optional[float] = None, **unused):
        super().__init__(config=config)
        self.softmax_scale = softmax_scale

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, **unused):
        # [s, b, heads, hn] -> [b, heads, s, hn]
        s, b = query.shape[:2]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=self.softmax_scale,
            enable_gqa=q.shape[1] != k.shape[1])
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)


class CRNetSelfAttention(SelfAttention):
    """Megatron SelfAttention with chain-carrying ``linear_qkv`` and ``linear_proj``."""

    def forward(self, hidden_states: torch.Tensor, rotary_pos_emb=None,
                chains: Optional[Tuple[torch.Tensor, torch.Tensor]] = None):
        qkv_prev, proj_prev = chains if chains is not None else (None, None)
        mixed = project(self.linear_qkv, hidden_states, qkv_prev)

        s, b = mixed.shape[:2]
        groups = self.num_query_groups_per_partition
        hn = self.hidden_size_per_attention_head
        split = positions.qkv_group_split(self.num_attention_heads_per_partition, groups, hn)
        grouped = mixed.view(s, b, groups, sum(split))
        query, key, value = torch.split(grouped, split, dim=3)
        query = query.reshape(s, b, -1, hn)

        if rotary_pos_emb is not None:
            q_emb, k_emb = (rotary_pos_emb if isinstance(rotary_pos_emb, tuple)
                            else (rotary_pos_emb, rotary_pos_emb))
            query = apply_rotary_pos_emb(query, q_emb, config=self.config)
            key = apply_rotary_pos_emb(key, k_emb, config=self.config)

        if self.checkpoint_core_attention and self.training and active_scheme() is None:
            context = tensor_parallel.checkpoint(self._core_attention, False, query, key, value)
        else:
            context = self._core_attention(query, key, value)
        context = context.reshape(s, b, -1)
        output = project(self.linear_proj, context, proj_prev)
        return output, (mixed, output)

    def _core_attention(self, query, key, value):
        return self.core_attention(query, key, value, None, attn_mask_type=self.attn_mask_type)
