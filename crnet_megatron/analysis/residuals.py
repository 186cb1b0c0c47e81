"""The paper's Figure 2 analysis on any model, and a per-layer rank schedule derived from it.

For every layer l >= 2 and projection p, with Y_l the projection's output over N tokens:

* direct: relative error of the best rank-r approximation of Y_l;
* cross-layer: relative error of ``beta Y_{l-1} + LR_r(Y_l - beta Y_{l-1})``. beta starts at the
  least-squares fit of Y_l on Y_{l-1} and is refined to minimise the rank-r tail (least
  squares on the part outside the rank-r subspace, iterated to its fixed point by secant
  steps; exact when Y_l - b Y_{l-1} has rank r);
* stable ranks ``||M||_F^2 / sigma_max(M)^2`` of Y_l and of the least-squares residual.

Errors are ``||Y_l - approx||_F / ||Y_l||_F``. ``suggest_ranks`` turns the smallest rank that
reaches a target cross-layer error per layer into a rank list for a parameter budget.
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import torch

from crnet_megatron.model import positions

POSITIONS = positions.NAMES


def _right_spectrum(m: torch.Tensor):
    """Eigen-decomposition of M^T M (descending): squared singular values, right vectors."""
    gram = m.T @ m
    evals, evecs = torch.linalg.eigh(gram)
    return evals.flip(0).clamp(min=0), evecs.flip(1)


def _tail(energy: torch.Tensor, r: int) -> float:
    return float(energy[r:].sum())


def _als_step(y, p, r, beta):
    """(tail energy at beta, the least-squares beta outside beta's rank-r row space)."""
    energy, vecs = _right_spectrum(y - beta * p)
    q = vecs[:, r:]  # the complement of the rank-r row space
    yq, pq = y @ q, p @ q
    return _tail(energy, r), float((yq * pq).sum() / (pq * pq).sum().clamp(min=1e-300))


def _fit_beta(y, p, r, beta0: float, rounds: int):
    """beta minimising the rank-r tail of Y - beta P: the fixed point of the alternating
    least-squares update, found by secant steps on update(beta) - beta (plain alternation
    converges slowly as the subspace turns). Returns (beta, tail energy); never worse than
    the start."""
    tail0, nxt0 = _als_step(y, p, r, beta0)
    best = (tail0, beta0)
    b_prev, g_prev = beta0, nxt0 - beta0
    b = nxt0
    for _ in range(rounds):
        tail, nxt = _als_step(y, p, r, b)
        best = min(best, (tail, b))
        g = nxt - b
        if abs(g) <= 1e-12 * max(1.0, abs(b)) or g == g_prev:
            break
        b, b_prev, g_prev = b - g * (b - b_prev) / (g - g_prev), b, g
    return best[1], best[0]


def analyze_pair(y: torch.Tensor, y_prev: torch.Tensor, ranks: Sequence[int],
                 rounds: int = 8) -> Dict:
    """Errors over ``ranks`` for one projection of one layer (float64)."""
    y, p = y.double().reshape(-1, y.shape[-1]), y_prev.double().reshape(-1, y_prev.shape[-1])
    norm2 = float((y * y).sum())
    energy_y, _ = _right_spectrum(y)
    beta_ls = float((y * p).sum() / (p * p).sum().clamp(min=1e-300))
    resid = y - beta_ls * p
    energy_r, _ = _right_spectrum(resid)
    rows = []
    for r in ranks:
        beta, tail = _fit_beta(y, p, r, beta_ls, rounds)
        rows.append(dict(r=r, err_direct=(_tail(energy_y, r) / norm2) ** 0.5,
                         err_cross=(tail / norm2) ** 0.5, beta=beta))
    return dict(rows=rows, beta_ls=beta_ls,
                stable_rank=float(energy_y.sum() / energy_y[0]) if energy_y[0] > 0 else 0.0,
                stable_rank_residual=(float(energy_r.sum() / energy_r[0])
                                      if energy_r[0] > 0 else 0.0),
                residual_energy=energy_r, norm2=norm2)


def needed_rank(result: Dict, target: float) -> int:
    """Smallest r with the least-squares cross-layer error <= target."""
    energy, norm2 = result["residual_energy"], result["norm2"]
    tails = energy.flip(0).cumsum(0).flip(0)  # tails[r] = sum_{i >= r}
    ok = (tails / norm2).sqrt() <= target
    idx = torch.nonzero(ok)
    return int(idx[0]) if len(idx) else len(energy)


def analyze_model(acts: List[Dict[str, torch.Tensor]], ranks: Sequence[int],
                  target: float, rounds: int = 8) -> List[Dict]:
    """Rows for every layer >= 2 and position; ``acts[l][p]`` is layer l's output [N, d]."""
    rows = []
    for layer in range(1, len(acts)):
        for pos in POSITIONS:
            res = analyze_pair(acts[layer][pos], acts[layer - 1][pos], ranks, rounds)
            need = needed_rank(res, target)
            for row in res["rows"]:
                rows.append(dict(layer=layer + 1, projection=pos, **row, beta_ls=res["beta_ls"],
                                 stable_rank=res["stable_rank"],
                                 stable_rank_residual=res["stable_rank_residual"],
                                 needed_rank=need))
    return rows


def suggest_ranks(needed: Sequence[float], total_rank: int, multiple: int,
                  max_rank: int) -> List[int]:
    """Ranks proportional to ``needed`` (one per CR-Net layer) summing to at most
    ``total_rank``, each a multiple of ``multiple`` in [multiple, max_rank]."""
    n = len(needed)
    weights = [max(float(x), 1e-9) for x in needed]
    units_total = max(n, total_rank // multiple)
    cap = max(1, max_rank // multiple)
    share = [w / sum(weights) * units_total for w in weights]
    units = [min(cap, max(1, int(s))) for s in share]
    # hand out what rounding left, largest remainder first, within the cap
    order = sorted(range(n), key=lambda i: share[i] - int(share[i]), reverse=True)
    left = units_total - sum(units)
    while left > 0 and any(u < cap for u in units):
        for i in order:
            if left > 0 and units[i] < cap:
                units[i] += 1
                left -= 1
    return [u * multiple for u in units]


def capture_projection_outputs(model, input_ids: torch.Tensor) -> List[Dict[str, torch.Tensor]]:
    """Each layer's 7 projection outputs (q, k, v pre-RoPE; with the CR-Net chain) of a
    ``CRNetForCausalLM`` on ``input_ids`` [b, s], flattened to [b s, d]."""
    names = {p.hf_name: p.name for p in positions.POSITIONS}
    acts: List[Dict[str, torch.Tensor]] = [dict() for _ in model.model.layers]
    hooks = []
    for i, layer in enumerate(model.model.layers):
        for block in (layer.self_attn, layer.mlp):
            for name, module in block.named_children():
                def hook(_m, _inp, out, i=i, pos=names[name]):
                    acts[i][pos] = out.detach().reshape(-1, out.shape[-1]).float()
                hooks.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(input_ids)
    finally:
        for h in hooks:
            h.remove()
    return acts
