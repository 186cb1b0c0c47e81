"""What this process runs on, in one line: Python, torch, CUDA and NCCL when a GPU is present,
megatron-core, Transformer Engine and apex when installed. Read from package metadata (and from
torch only when it is already imported), so a light command pays no import for it. Every command
prints it once at the start of its work (stderr); runs store it with their config and
checkpoints."""

from __future__ import annotations

import importlib.metadata
import platform
import sys
from typing import Dict, Optional

# (label, distribution names as installed by pip / by NGC source builds)
PACKAGES = (("torch", ("torch",)), ("megatron-core", ("megatron-core", "megatron_core")),
            ("transformer-engine", ("transformer-engine", "transformer_engine",
                                    "transformer-engine-torch")),
            ("apex", ("apex",)))
_ANNOUNCED = False
# Transformer Engine versions megatron-core 0.16.1 is tested with (its ``dev`` extra): [low, high)
TE_TESTED_RANGE = ("2.9", "2.12")


def te_range_problem(te: Optional[str]) -> Optional[str]:
    """None when ``te`` (a version, or None/"-" when absent) is in ``TE_TESTED_RANGE``;
    otherwise the one line the Docker build and the self-test print."""
    from packaging.version import Version

    low, high = TE_TESTED_RANGE
    if te not in (None, "-") and Version(f"{low}.0a0") <= Version(te) < Version(f"{high}.0"):
        return None
    return (f"transformer-engine {te} is outside megatron-core 0.16.1's tested range "
            f"[{low}, {high})")


def _version(names) -> Optional[str]:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def versions() -> Dict[str, str]:
    out = {"python": platform.python_version()}
    for label, names in PACKAGES:
        out[label] = _version(names) or "-"
    torch = sys.modules.get("torch")
    if torch is not None:  # the build imported (a local version such as +cu130 included)
        out["torch"] = str(torch.__version__)
    if torch is not None and torch.cuda.is_available():
        out["cuda"] = str(torch.version.cuda)
        nccl = torch.cuda.nccl.version()
        out["nccl"] = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
        out["gpu"] = torch.cuda.get_device_name()
    return out


def banner() -> str:
    return "versions: " + ", ".join(f"{k} {v}" for k, v in versions().items())


def announce(stream=None) -> None:
    """Print the banner once per process (stderr by default, so a command's stdout stays its
    output; a command whose errors surface mid-work passes stdout, keeping stderr one line)."""
    global _ANNOUNCED
    if not _ANNOUNCED:
        _ANNOUNCED = True
        print(banner(), file=stream or sys.stderr, flush=True)
