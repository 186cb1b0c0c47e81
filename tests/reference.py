"""Single-device reference of the paper's Eq. 6 model in plain PyTorch: the test oracle.

Seven separate projections per layer (q, k, v, o, gate, up, down); dense ``W`` in the first
``dense_layers`` layers, ``Y_l = s(beta) Y_{l-1} + X A B`` after. Row-vector convention
(``Y = X W``). Its own RMSNorm, RoPE (rotate-half) and softmax attention; nothing from Megatron.
``from_megatron`` converts a TP=1 Megatron state dict into this model's parameter layout.
It states the seven positions and Megatron's fused layouts itself, on purpose: an oracle that
read ``model.positions`` could not catch an error there (``tests/test_layering.py`` checks the
two agree).
"""

from __future__ import annotations

import math
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import nn

POSITIONS = ("q", "k", "v", "o", "gate", "up", "down")


class ReferenceCRNet(nn.Module):
    def __init__(self, vocab_size: int, hidden: int, ffn: int, heads: int, groups: int,
                 num_layers: int, ranks: List[int], dense_layers: int = 1, eps: float = 1e-6,
                 norm_eps: float = 1e-6, rope_base: float = 10000.0):
        super().__init__()
        self.hidden, self.heads, self.groups = hidden, heads, groups
        self.head_dim = hidden // heads
        self.eps, self.norm_eps, self.rope_base = eps, norm_eps, rope_base
        self.dense_layers = dense_layers
        q, kv = heads * self.head_dim, groups * self.head_dim
        self.shapes = dict(q=(hidden, q), k=(hidden, kv), v=(hidden, kv), o=(q, hidden),
                           gate=(hidden, ffn), up=(hidden, ffn), down=(ffn, hidden))
        self.embed = nn.Parameter(torch.randn(vocab_size, hidden) * 0.02)
        self.lm_head = nn.Parameter(torch.randn(vocab_size, hidden) * 0.02)
        self.norm = nn.Parameter(torch.ones(hidden))
        self.layers = nn.ModuleList()
        for i in range(num_layers):
            layer = nn.ParameterDict({"attn_norm": nn.Parameter(torch.ones(hidden)),
                                      "mlp_norm": nn.Parameter(torch.ones(hidden))})
            for p, (h_in, h_out) in self.shapes.items():
                if i < dense_layers:
                    layer[f"W_{p}"] = nn.Parameter(torch.randn(h_in, h_out) * 0.02)
                else:
                    r = ranks[i - dense_layers]
                    layer[f"A_{p}"] = nn.Parameter(torch.randn(h_in, r) * 0.05)
                    layer[f"B_{p}"] = nn.Parameter(torch.randn(r, h_out) * 0.05)
                    layer[f"beta_{p}"] = nn.Parameter(torch.ones(()))
            self.layers.append(layer)

    def _rms(self, x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.norm_eps) * w

    def _rope(self, x):  # x: [b, s, heads, d]
        d, s = x.shape[-1], x.shape[1]
        inv = 1.0 / (self.rope_base ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
        f = torch.outer(torch.arange(s, dtype=torch.float32), inv)
        cos, sin = torch.cat([f, f], -1).cos()[None, :, None], torch.cat([f, f], -1).sin()[None, :, None]
        x1, x2 = x[..., : d // 2], x[..., d // 2:]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    def _proj(self, layer, li, p, x, ys):
        if li < self.dense_layers:
            y = x @ layer[f"W_{p}"]
        else:
            beta = layer[f"beta_{p}"]
            s = torch.sign(beta) * (beta.abs() + self.eps)
            y = s * ys[p] + (x @ layer[f"A_{p}"]) @ layer[f"B_{p}"]
        ys[p] = y
        return y

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        b, s = ids.shape
        h = self.embed[ids]
        ys: Dict[str, torch.Tensor] = {}
        mask = torch.full((s, s), float("-inf")).triu(1)
        for li, layer in enumerate(self.layers):
            x = self._rms(h, layer["attn_norm"])
            q = self._proj(layer, li, "q", x, ys).view(b, s, self.heads, self.head_dim)
            k = self._proj(layer, li, "k", x, ys).view(b, s, self.groups, self.head_dim)
            v = self._proj(layer, li, "v", x, ys).view(b, s, self.groups, self.head_dim)
            q, k = self._rope(q), self._rope(k)
            rep = self.heads // self.groups
            k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
            att = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(self.head_dim) + mask
            ctx = torch.einsum("bhqk,bkhd->bqhd", att.softmax(-1), v).reshape(b, s, -1)
            h = h + self._proj(layer, li, "o", ctx, ys)
            x = self._rms(h, layer["mlp_norm"])
            g = self._proj(layer, li, "gate", x, ys)
            u = self._proj(layer, li, "up", x, ys)
            h = h + self._proj(layer, li, "down", F.silu(g) * u, ys)
        return self._rms(h, self.norm) @ self.lm_head.T

    def loss(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.forward(ids)
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view_as(labels)


def from_megatron(sd: Dict[str, torch.Tensor], num_layers: int, dense_layers: int, heads: int,
                  groups: int, rank_of=None) -> Dict[str, torch.Tensor]:
    """Map a TP=1 Megatron state dict (weights or grads) to ReferenceCRNet parameter names."""
    out = {"embed": sd["embedding.word_embeddings.weight"], "lm_head": sd["output_layer.weight"],
           "norm": sd["decoder.final_layernorm.weight"]}
    qpg = heads // groups
    for i in range(num_layers):
        pre, dst = f"decoder.layers.{i}.", f"layers.{i}."
        out[dst + "attn_norm"] = sd[pre + "input_layernorm.weight"]
        out[dst + "mlp_norm"] = sd[pre + "pre_mlp_layernorm.weight"]
        attn, mlp = pre + "self_attention.", pre + "mlp."
        if i < dense_layers:
            w = sd[attn + "linear_qkv.weight"]
            hn = w.shape[0] // (groups * (qpg + 2))
            wg = w.view(groups, (qpg + 2) * hn, -1)
            out[dst + "W_q"] = wg[:, : qpg * hn].reshape(-1, w.shape[1]).T
            out[dst + "W_k"] = wg[:, qpg * hn: (qpg + 1) * hn].reshape(-1, w.shape[1]).T
            out[dst + "W_v"] = wg[:, (qpg + 1) * hn:].reshape(-1, w.shape[1]).T
            out[dst + "W_o"] = sd[attn + "linear_proj.weight"].T
            gate, up = sd[mlp + "linear_fc1.weight"].chunk(2, 0)
            out[dst + "W_gate"], out[dst + "W_up"] = gate.T, up.T
            out[dst + "W_down"] = sd[mlp + "linear_fc2.weight"].T
            continue
        for mod, names in ((attn + "linear_qkv.", ("q", "k", "v")), (mlp + "linear_fc1.", ("gate", "up"))):
            a = sd[mod + "linear_a.weight"].chunk(len(names), 0)
            for j, p in enumerate(names):
                out[dst + f"A_{p}"] = a[j].T
                out[dst + f"B_{p}"] = sd[mod + f"linear_b.{p}.weight"].T
                out[dst + f"beta_{p}"] = sd[mod + "beta"][j]
        for mod, p in ((attn + "linear_proj.", "o"), (mlp + "linear_fc2.", "down")):
            out[dst + f"A_{p}"] = sd[mod + "linear_a.weight"].T
            out[dst + f"B_{p}"] = sd[mod + "linear_b.weight"].T
            out[dst + f"beta_{p}"] = sd[mod + "beta"][0]
    return out
