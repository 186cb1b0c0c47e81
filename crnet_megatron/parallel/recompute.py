"""Activation recomputation for the CR-Net block.

``recompute_granularity: crnet`` is the paper's Algorithm 1. One autograd function spans the
stage's layers. Forward (no graph) stores, per layer: the block input h_l, the low-rank codes
Z = X A of every CR-Net projection (this rank's shard), and the chain outputs Y only at the
checkpoint set (the stage's last layer and every ``crnet_checkpoint_every``-th layer before it;
dense layers never). Backward walks the layers down: it recovers each missing
``Y_{l-1} = (Y_l - Z_l B_l) / s(beta_l)`` (fp32; one r x h_out matmul per position), rebuilds
the layer's graph from h_l, Y_{l-1} and the saved codes with ``ReplayLinear`` (no X A and no
Z B matmul is re-run: their outputs are known), recomputing only norms, RoPE, attention and
SwiGLU, and backpropagates through it. Dense layers are recomputed as they are. A chain whose
next-layer ``|s(beta)|`` is below ``crnet_recompute_min_scale``, or (16-bit chains) whose
next-layer update dwarfs it (``||Z B|| > crnet_recompute_max_ratio * ||s(beta) Y||``, measured
in the forward; ``conditioning`` decides from the previous step's statistics, so no layer waits
for the device), is stored instead of inverted.
No RNG is involved (the model has no dropout), so nothing depends on the CUDA RNG tracker.

``recompute_granularity: full`` is Megatron's uniform/block layer checkpointing
(``tensor_parallel.checkpoint``) where the saved inputs are the residual stream and the
incoming chain tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
from megatron.core import tensor_parallel

from crnet_megatron.analysis import counting
from crnet_megatron.model.chain_ops import invert_chain
from crnet_megatron.model.layer import Chains
from crnet_megatron.model.linears import is_crnet_linear
from crnet_megatron.model.projection import projection_scheme
from crnet_megatron.parallel.conditioning import StageGuard, log_fallback, small_scales


def chain_modules(layer) -> List[torch.nn.Module]:
    """The four projections of a layer, in ``Chains`` order."""
    att, mlp = layer.self_attention, layer.mlp
    return [att.linear_qkv, att.linear_proj, mlp.linear_fc1, mlp.linear_fc2]


def is_crnet_layer(layer) -> bool:
    return is_crnet_linear(layer.self_attention.linear_qkv)


def checkpoint_set(layers: Sequence, config) -> set:
    """Stage-local indices whose Y is stored (``counting.checkpoint_set``: Algorithm 1's A, on
    the global layer index: Megatron's ``layer_number`` is 1-based and global)."""
    return counting.checkpoint_set([not is_crnet_layer(layer) for layer in layers],
                                   config.crnet_checkpoint_every,
                                   first=layers[0].layer_number - 1, num_layers=config.num_layers)


class _Record:
    """Forward: CR-Net projections run normally and hand over their codes (and, when asked,
    how ill-conditioned inverting them would be: ||Z B|| / ||s(beta) Y_prev||)."""

    def __init__(self, measure: bool):
        self.codes, self.ratios, self.measure = {}, {}, measure

    def project(self, linear, x, prev):
        if is_crnet_linear(linear):
            y, self.codes[linear], zb = linear.forward_with_codes(x, prev, keep_zb=self.measure)
            if self.measure:
                zb32 = zb.float()
                carried = (y.float() - zb32).norm().clamp_min(1e-30)
                self.ratios[linear] = zb32.norm() / carried
            return y
        return linear(x)[0]


class _Replay:
    """Backward: CR-Net projections rebuild their graph from known codes and outputs."""

    def __init__(self, z_full, y):
        self.z_full, self.y = z_full, y

    def project(self, linear, x, prev):
        if is_crnet_linear(linear):
            return linear.replay(x, prev, self.z_full[linear], self.y[linear])
        return linear(x)[0]


@dataclass
class _LayerSaved:
    """Where one layer's saved tensors sit in ``ctx.saved_tensors``."""

    hidden: int                                  # the layer input h_l
    codes: Dict[torch.nn.Module, int] = field(default_factory=dict)  # Z per CR-Net projection
    chains: List[Optional[int]] = field(default_factory=lambda: [None] * 4)  # Y, or None: invert


class _Saved:
    """What Algorithm 1 keeps: the stage's input chains first, then per layer a ``_LayerSaved``
    pointing into one flat tensor list (what ``save_for_backward`` takes)."""

    def __init__(self, chains_in: Sequence[torch.Tensor]):
        self.tensors: List[torch.Tensor] = list(chains_in)
        self.n_chains_in = len(chains_in)
        self.layers: List[_LayerSaved] = []

    def add(self, tensor: torch.Tensor) -> int:
        self.tensors.append(tensor)
        return len(self.tensors) - 1


class CRNetRecomputeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, stage, hidden, *chains_in):
        layers, rope, config = stage
        store = checkpoint_set(layers, config)
        max_ratio = _max_ratio(config, hidden)
        small_now = small_scales(layers, chain_modules, is_crnet_layer,
                                 config.crnet_recompute_min_scale)
        guard = StageGuard.of(layers)
        small, ill = guard.decisions(small_now)
        chains = Chains(*chains_in) if chains_in else None
        saved, ratios = _Saved(chains_in), []
        for i, layer in enumerate(layers):
            rec = _Record(measure=max_ratio is not None and i > 0 and is_crnet_layer(layer))
            entry = _LayerSaved(hidden=saved.add(hidden))
            prev = chains
            with projection_scheme(rec):
                hidden, chains = layer(hidden, chains, rotary_pos_emb=rope)
            entry.codes = {m: saved.add(z) for m, z in rec.codes.items()}
            if rec.ratios:  # Y_{i-1} is still alive: keep it where inverting layer i is unsafe
                row = torch.stack([rec.ratios[m] for m in chain_modules(layer)])
                ratios.append((i, row))
                bad = ill[i] if ill is not None else (row > max_ratio).tolist()  # first step
                _store_ill_conditioned(layer, bad, prev, saved, saved.layers[i - 1], max_ratio)
            for c in range(4):
                if small[i][c]:
                    log_fallback(layer.layer_number, c,
                                 f"|s(beta)| < {config.crnet_recompute_min_scale:g}")
                if i in store or small[i][c]:
                    entry.chains[c] = saved.add(chains[c])
            saved.layers.append(entry)
        guard.record(small_now, ratios, max_ratio)
        ctx.save_for_backward(*saved.tensors)
        ctx.stage, ctx.layers, ctx.n_chains_in = stage, saved.layers, saved.n_chains_in
        return (hidden, *chains)

    @staticmethod
    def backward(ctx, grad_hidden, *grad_chains):
        layers, rope, _ = ctx.stage
        saved = ctx.saved_tensors
        y_cur: Optional[List[torch.Tensor]] = [saved[j] for j in ctx.layers[-1].chains]
        g_h, g_y = grad_hidden, list(grad_chains)
        for i in range(len(layers) - 1, -1, -1):
            layer = layers[i]
            crnet = is_crnet_layer(layer)
            with torch.no_grad():
                prev, z_full, y_known = _recover(layer, i, ctx, saved, y_cur) \
                    if crnet else (None, None, None)
            with torch.enable_grad():
                h_leaf = saved[ctx.layers[i].hidden].detach().requires_grad_(True)
                leaves = None
                if crnet:
                    leaves = [p.detach().to(h_leaf.dtype).requires_grad_(True) for p in prev]
                with projection_scheme(_Replay(z_full, y_known) if crnet else None):
                    h_out, c_out = layer(h_leaf, Chains(*leaves) if crnet else None,
                                         rotary_pos_emb=rope)
                outs, grads = [h_out], [g_h]
                for t, g in zip(c_out, g_y):
                    if g is not None and t.requires_grad:
                        outs.append(t)
                        grads.append(g)
                torch.autograd.backward(outs, grads)
            g_h = h_leaf.grad
            g_y = [leaf.grad for leaf in leaves] if crnet else [None] * 4
            y_cur = prev
        g_in = [g if g is not None else torch.zeros_like(c)
                for g, c in zip(g_y, saved[:ctx.n_chains_in])]
        return (None, g_h, *g_in)


def _store_ill_conditioned(layer, bad: List[bool], prev, saved: _Saved, below: _LayerSaved,
                           max_ratio: float) -> None:
    """Store the incoming chains (the layer below's Y) that inverting this layer would recover
    badly (``conditioning``: decided from the previous step's ratios)."""
    for c, flag in enumerate(bad):
        if flag and below.chains[c] is None:
            log_fallback(layer.layer_number - 1, c,
                         f"||Z B|| / ||s(beta) Y|| > {max_ratio:g}")
            below.chains[c] = saved.add(prev[c])


def _max_ratio(config, hidden) -> Optional[float]:
    """The conditioning guard applies to 16-bit chains (8-bit mantissa: inverting a chain whose
    carried term is 2^k times smaller than Z B loses k of them); fp32 has 24 bits to spare."""
    if config.crnet_recompute_max_ratio is None or hidden.dtype == torch.float32:
        return None
    return float(config.crnet_recompute_max_ratio)


def _recover(layer, i, ctx, saved, y_cur):
    """Y_{l-1} for the four chains (stored, stage input, or inverted in fp32), full codes, and
    the layer's known outputs Y_l (what the replay returns)."""
    mods = chain_modules(layer)
    prev, z_full, y = [], {}, {}
    for c, m in enumerate(mods):
        z_full[m] = m.gather_codes(saved[ctx.layers[i].codes[m]])
        y[m] = y_cur[c]
        stored = ctx.layers[i - 1].chains[c] if i > 0 else None
        if i == 0:
            p = saved[c]  # the stage's input chains (pipeline stage > 0)
        elif stored is not None:
            p = saved[stored]
        else:
            p = invert_chain(y_cur[c], m.factors(z_full[m]), m.position_scales(), m.slices)
        prev.append(p)
    return prev, z_full, y


def crnet_recompute(layers, hidden, chains: Optional[Chains], rope, config):
    """Run the stage's layers under Algorithm 1; returns (hidden, Chains)."""
    chains_in = tuple(chains) if chains is not None else ()
    out = CRNetRecomputeFunction.apply((list(layers), rope, config), hidden, *chains_in)
    return out[0], Chains(*out[1:])


def megatron_full_recompute(layers, hidden, chains: Optional[Chains], rope, config):
    """Megatron ``full`` recompute with the chains as checkpoint inputs, as Megatron chunks it:
    ``uniform`` checkpoints every ``recompute_num_layers`` layers as one chunk; ``block``
    checkpoints each of the first ``recompute_num_layers`` layers on its own and runs the rest
    without (``planner.per_rank.full_recompute_chunks`` counts the same)."""
    n, k = len(layers), config.recompute_num_layers or 1

    def run(start, end):
        def fn(h, *c):
            cs = Chains(*c) if c else None
            for layer in layers[start:end]:
                h, cs = layer(h, cs, rotary_pos_emb=rope)
            return (h, *(cs or ()))
        return fn

    block = config.recompute_method == "block"
    start = 0
    while start < n:
        if block and start >= k:  # the rest keeps its activations
            out, end = run(start, n)(hidden, *(chains or ())), n
        else:
            end = start + 1 if block else min(n, start + k)
            out = tensor_parallel.checkpoint(run(start, end), False, hidden, *(chains or ()))
        if not isinstance(out, tuple):
            out = (out,)
        hidden, chains = out[0], (Chains(*out[1:]) if len(out) > 1 else None)
        start = end
    return hidden, chains


def layer_runner(config) -> Optional[Callable]:
    """The training-time runner of a stage's layers for ``recompute_granularity``: Algorithm 1
    (``crnet``), Megatron ``full``, or None (layers run as they are; ``selective`` is applied
    inside attention)."""
    return {"crnet": crnet_recompute, "full": megatron_full_recompute}.get(
        config.recompute_granularity)
