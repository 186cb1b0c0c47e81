"""How the layers split over pipeline stages and virtual-pipeline model chunks, Megatron's rule
stated once (no torch: the model config, the run config's pre-flight rules and the planner
read it)."""

from __future__ import annotations

from typing import List, Optional


def stage_layers(num_layers: int, pp: int, first: Optional[int] = None,
                 last: Optional[int] = None) -> Optional[List[int]]:
    """Layers held by each of the ``pp`` stages: ``first`` / ``last`` when set (uneven stages,
    Megatron's ``num_layers_in_first/last_pipeline_stage``), the rest split evenly over the
    middle stages; None when they do not split."""
    ends = [n for n in (first, last) if n is not None]
    middle_stages, middle = pp - len(ends), num_layers - sum(ends)
    if middle < 0 or pp < 1 or (middle_stages == 0 and middle) or \
            (middle_stages > 0 and middle % middle_stages) or (pp == 1 and ends):
        return None
    per = middle // middle_stages if middle_stages else 0
    counts = [per] * pp
    if first is not None:
        counts[0] = first
    if last is not None:
        counts[-1] = last
    return counts


def chunk_layers(num_layers: int, pp: int, vpp: Optional[int], first: Optional[int] = None,
                 last: Optional[int] = None) -> Optional[List[int]]:
    """Layers in one model chunk of each stage (each stage's layers split into ``vpp`` equal
    chunks; ``vpp=None`` is one chunk per stage); None when they do not split."""
    counts = stage_layers(num_layers, pp, first, last)
    v = vpp or 1
    if counts is None or any(n % v for n in counts):
        return None
    return [n // v for n in counts]


def rank_chunks(num_layers: int, pp: int, vpp: Optional[int], rank: int,
                first: Optional[int] = None, last: Optional[int] = None) -> List[List[int]]:
    """The 0-based global layers of each model chunk of pipeline ``rank`` (Megatron's
    ``get_transformer_layer_offset``): chunk ``c`` of every rank comes after chunk ``c`` of
    the ranks before it and after all of chunk ``c - 1``."""
    sizes = chunk_layers(num_layers, pp, vpp, first, last)
    if sizes is None:
        raise ValueError(f"{num_layers} layers do not split into {pp} stages of {vpp or 1} "
                         f"chunks (first stage {first}, last stage {last})")
    lap = sum(sizes)  # layers in one chunk of every rank
    return [list(range(c * lap + sum(sizes[:rank]), c * lap + sum(sizes[:rank + 1])))
            for c in range(vpp or 1)]
