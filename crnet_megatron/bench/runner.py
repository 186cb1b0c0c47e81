"""What every benchmark shares: its arguments, interleaved timing, one Markdown table, one JSON.

The machine is noisy, so variants are timed side by side: after warm-up each repeat runs every
variant once in turn (``interleaved``), and a table reports the minimum and the median of the
repeats and ratios of minima. ``table`` prints Markdown; ``finish`` prints the table(s) and
writes the JSON given by ``--json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

Column = Tuple[str, str, str]  # (header, row key, format spec or "")


def parser(doc: str, prog: str, reduced: bool = False, repeats: Optional[int] = None,
           warmup: int = 2) -> argparse.ArgumentParser:
    """The common arguments: ``--json``; ``--reduced`` (tiny shapes for CI) and
    ``--repeats``/``--warmup`` for the benchmarks that offer them."""
    p = argparse.ArgumentParser(prog=f"crnet-bench {prog}", description=doc.splitlines()[0])
    p.add_argument("--json", help="write the rows and settings here")
    if reduced:
        p.add_argument("--reduced", action="store_true", help="tiny shapes, 2 repeats (CI)")
    if repeats is not None:
        p.add_argument("--repeats", type=int, default=repeats)
        p.add_argument("--warmup", type=int, default=warmup)
    return p


def interleaved(fns: Dict[str, Callable[[], object]], warmup: int, repeats: int,
                sync: Callable[[], None] = lambda: None) -> Dict[str, List[float]]:
    """{variant: [seconds per repeat]}: warm-up, then each repeat runs every variant in turn."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return times


def timing_rows(times: Dict[str, List[float]], baseline: str, **fields) -> List[Dict]:
    """One row per variant: min and median ms, and the ratio of minima to ``baseline``."""
    base = min(times[baseline])
    return [dict(fields, variant=name, min_ms=1e3 * min(ts),
                 median_ms=1e3 * statistics.median(ts), vs=baseline, ratio=min(ts) / base)
            for name, ts in times.items()]


def _cell(value, spec: str) -> str:
    if value is None:
        return "-"
    if spec and isinstance(value, (int, float)) and not isinstance(value, bool):
        return format(value, spec)
    return str(value)


def table(rows: Sequence[Dict], columns: Sequence[Column], title: str = "") -> str:
    """A Markdown table of ``rows``."""
    lines = [f"## {title}", ""] if title else []
    lines.append("| " + " | ".join(c[0] for c in columns) + " |")
    lines.append("|" + "---|" * len(columns))
    for r in rows:
        lines.append("| " + " | ".join(_cell(r.get(key), spec) for _, key, spec in columns)
                     + " |")
    return "\n".join(lines)


def finish(parsed, tables: Sequence[str], **payload) -> None:
    """Print the tables; write ``payload`` (rows and settings) to ``--json`` if given."""
    print("\n\n".join(tables))
    if getattr(parsed, "json", None):
        with open(parsed.json, "w") as f:
            json.dump(payload, f, indent=1, default=str)


@contextlib.contextmanager
def one_process(seed: int = 1):
    """A one-rank process group (Megatron modules need parallel state) for the block."""
    from crnet_megatron.parallel.environment import announce
    from crnet_megatron.parallel.groups import destroy_distributed, init_distributed

    announce()
    init_distributed(1, 1, seed=seed)
    try:
        yield
    finally:
        destroy_distributed()
