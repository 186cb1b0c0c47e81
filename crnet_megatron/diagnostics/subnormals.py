"""Where subnormal floats arise: counted per operator (every tensor an op returns while the
counter is entered) and per part of the training state (parameters, their gradients, Adam's
moments). Subnormals (0 < |x| < 1.2e-38 in fp32) run tens of times slower on x86 cores, so a CPU
step that slows as training goes on is first checked here (``crnet-bench subnormals``)."""

from __future__ import annotations

from collections import Counter
from typing import Dict, Iterable, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def subnormal_count(t: torch.Tensor) -> int:
    """Subnormal elements of a floating tensor (0 for others)."""
    if not t.is_floating_point() or t.numel() == 0:
        return 0
    tiny = torch.finfo(t.dtype).tiny
    return int(((t != 0) & (t.abs() < tiny)).sum())


class SubnormalsByOp(TorchDispatchMode):
    """While entered: ``counts[op]`` = subnormal elements in the tensors ``op`` returned (views
    count again: it points at the op that produced or passed them on)."""

    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                n = subnormal_count(t)
                if n:
                    self.counts[str(func.overloadpacket)] += n
        return out


def state_subnormals(named_params: Iterable[Tuple[str, torch.nn.Parameter]],
                     optimizer_states: Iterable[Dict]) -> Dict[str, int]:
    """{"params", "grads", "adam"}: subnormal elements in the parameters, their (main)
    gradients and the optimizer's per-parameter state tensors."""
    out = Counter()
    for _, p in named_params:
        out["params"] += subnormal_count(p.detach())
        grad = getattr(p, "main_grad", None)
        grad = grad if grad is not None else p.grad
        if grad is not None:
            out["grads"] += subnormal_count(grad)
    for state in optimizer_states:
        out["adam"] += sum(subnormal_count(v) for v in state.values() if torch.is_tensor(v))
    return dict(out)
