"""Which checkpoint to resume from, read safely: the tracker, the ``iter_N`` directories,
each checkpoint checked complete (its files, ``.metadata`` bounds, checksums) and its
``common.pt`` keys and types, before anything is built from it. In the run's own save directory
a newest checkpoint that is missing, unreadable or corrupt is moved aside (``iter_N.broken``)
and the newest complete one is used, with a loud message; a ``checkpoint.load`` directory
elsewhere is only read.
"""

from __future__ import annotations

import os
import shutil
import sys
from typing import Any, Dict, List, Optional, Tuple

import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from crnet_megatron.checkpoint import run_dir
from crnet_megatron.checkpoint.integrity import verify_checksums
from crnet_megatron.checkpoint.run_dir import TRACKER
from crnet_megatron.checkpoint.safe_checkpoint import (
    IncompleteCheckpointError,
    UnsafeCheckpointError,
    read_common_state,
    verify_checkpoint,
)
from crnet_megatron.config import run_config
from crnet_megatron.data.safe_files import UnsafePathError, check_readable, write_text

_ITER_DIR = run_dir.ITER_DIR
_PARTIAL = run_dir.PARTIAL


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def read_latest(root: str) -> Optional[int]:
    path = os.path.join(root, TRACKER)
    if not os.path.exists(path):
        return None
    try:
        check_readable(path, "checkpoint tracker")
    except UnsafePathError as e:
        raise IncompleteCheckpointError(str(e)) from None
    with open(path, "rb") as f:
        text = f.read(64).decode("ascii", "replace").strip()
    if not text.isdigit():
        raise IncompleteCheckpointError(f"corrupt checkpoint tracker {path}: {text!r} is not an "
                                        "iteration")
    return int(text)


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def read_checkpoint(path: str, verify: str = "all") -> Dict[str, Any]:
    """The non-sharded state of one checkpoint, after checking it is complete and safe, and
    its checksums as ``verify`` asks (``integrity``)."""
    if not os.path.isdir(path) or not os.path.exists(os.path.join(path, "metadata.json")):
        raise IncompleteCheckpointError(f"checkpoint {path} is missing or incomplete (no "
                                        "metadata.json)")
    for name in ("metadata.json", "common.pt", ".metadata"):  # a FIFO would block open()
        if os.path.exists(os.path.join(path, name)):
            try:
                check_readable(os.path.join(path, name), "checkpoint file")
            except UnsafePathError as e:
                raise IncompleteCheckpointError(str(e)) from None
    verify_checkpoint(path)
    verify_checksums(path, verify)
    try:
        common = read_common_state(path)
    except (UnsafeCheckpointError, IncompleteCheckpointError):
        raise
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - unreadable common state
        raise IncompleteCheckpointError(f"checkpoint {path} is unreadable: {e}") from None
    if not isinstance(common, dict) or not isinstance(common.get("common"), dict):
        raise IncompleteCheckpointError(f"checkpoint {path} has no training state in common.pt")
    _check_common(common["common"], path)
    _refuse_newer_megatron(common["common"], path)
    return dict(common["common"], path=path)


class NewerCheckpointError(ValueError):
    """A checkpoint written by a newer megatron-core than this one: refused, never moved aside
    (it is not broken)."""


def _refuse_newer_megatron(common: Dict[str, Any], path: str) -> None:
    """A checkpoint records the megatron-core that wrote it; an older one may misread its
    layout (0.17 moved the common state into the shard files), so moving back is refused."""
    import megatron.core
    from packaging.version import InvalidVersion, Version

    versions = common.get("versions")
    saved = versions.get("megatron-core") if isinstance(versions, dict) else None
    try:
        newer = saved is not None and Version(str(saved)) > Version(megatron.core.__version__)
    except InvalidVersion:
        newer = False
    if newer:
        raise NewerCheckpointError(
            f"checkpoint {path} was written by megatron-core {saved}; this is megatron-core "
            f"{megatron.core.__version__}, which may not read it: install megatron-core>="
            f"{saved} (or resume with the one that wrote it); nothing was moved")


# what a checkpoint's common.pt holds: key -> (types, required)
_COMMON = {"iteration": (int, True), "consumed_samples": (int, True), "scheduler": (dict, True),
           "config": (dict, False), "vocab_size": (int, False), "run_id": (str, False),
           "layout": (dict, False), "model_shape": (dict, False), "tokenizer": (dict, False),
           "skipped_iterations": (int, False), "optimizer_format": ((str, type(None)), False)}


def _check_common(common: Dict[str, Any], path: str) -> None:
    """Keys the resume reads have the types it expects: one line naming the key otherwise."""
    for key, (types, required) in _COMMON.items():
        if key not in common:
            if required:
                raise IncompleteCheckpointError(f"checkpoint {path}: common.pt lacks {key!r}")
            continue
        value = common[key]
        if not isinstance(value, types) or isinstance(value, bool) or \
                (isinstance(value, int) and value < 0):
            raise IncompleteCheckpointError(
                f"checkpoint {path}: common.pt holds {key}={value!r:.60}, expected "
                f"{getattr(types, '__name__', types)}{' >= 0' if types is int else ''}")


def _candidates(root: str) -> Tuple[List[int], List[str]]:
    """Iterations to try, newest first (the tracker's and every iter_N directory)."""
    notes, iters = [], set()
    try:
        latest = read_latest(root)
        if latest is not None:
            iters.add(latest)
    except IncompleteCheckpointError as e:
        notes.append(str(e))
    for name in os.listdir(root):
        m = _ITER_DIR.match(name)
        if m and os.path.isdir(os.path.join(root, name)):
            iters.add(int(m.group(1)))
    return sorted(iters, reverse=True), notes


def _remove_partial_saves(root: str) -> None:
    """``iter_NNNNNNN.tmp`` directories of a killed save of this run (the lock makes them ours;
    the previous checkpoint is intact)."""
    for name in os.listdir(root):
        if _PARTIAL.match(name) and os.path.isdir(os.path.join(root, name)) \
                and not os.path.islink(os.path.join(root, name)):
            shutil.rmtree(os.path.join(root, name))


def find_resumable(root: str, writable: bool = True,
                   verify: str = "all") -> Optional[Dict[str, Any]]:
    """The newest complete checkpoint under ``root`` (None when there is none at all).

    Newer ones that are missing or unreadable are skipped; in the run's own save directory
    (``writable``) they are moved aside to ``iter_N.broken`` and the tracker is pointed at the
    one used, so a requeued job resumes instead of dying. A ``checkpoint.load`` directory that is
    not the save directory is only read. A checkpoint that would execute code is never skipped
    quietly: it stops the run.
    """
    if not os.path.isdir(root):
        return None
    _barrier()
    if _rank0() and writable:
        _remove_partial_saves(root)
    _barrier()
    iterations, problems = _candidates(root)
    broken: List[int] = []
    chosen = None
    for it in iterations:
        try:
            chosen = read_checkpoint(iteration_dir(root, it), verify)
            break
        except (UnsafeCheckpointError, NewerCheckpointError):
            raise
        except IncompleteCheckpointError as e:
            problems.append(str(e))
            broken.append(it)
    if chosen is None:
        if problems:
            raise IncompleteCheckpointError(f"no readable checkpoint in {root}: "
                                            + "; ".join(problems))
        return None
    if problems and not writable:
        if _rank0():
            print("WARNING: " + "; ".join(problems) + f". Resuming from {chosen['path']} "
                  f"({root} is only read).", file=sys.stderr, flush=True)
    elif problems:
        _barrier()  # every rank has read the directory before rank 0 changes it
        if _rank0():
            moved = []
            for it in broken:
                path = iteration_dir(root, it)
                if os.path.isdir(path):
                    moved.append(_move_aside(path))
            write_text(os.path.join(root, TRACKER), str(chosen["iteration"]),
                       "checkpoint tracker")
            print("WARNING: " + "; ".join(problems) + ". Unreadable checkpoints moved aside "
                  f"({', '.join(os.path.basename(m) for m in moved) or 'none left'}; nothing "
                  f"is deleted); resuming from {chosen['path']}.", file=sys.stderr, flush=True)
        _barrier()
    return chosen


def _move_aside(path: str) -> str:
    """Rename a broken checkpoint to ``iter_N.broken``, or ``.broken.2``, ``.broken.3``, ... when
    an earlier one broke there too: a move-aside never deletes what an earlier one kept."""
    aside, k = path + ".broken", 1
    while os.path.lexists(aside):
        k += 1
        aside = f"{path}.broken.{k}"
    os.replace(path, aside)
    return aside


def load_common(root: str, iteration: Optional[int] = None, writable: bool = True,
                verify: str = "all") -> Optional[Dict[str, Any]]:
    """The non-sharded state of the given iteration, or of the newest complete checkpoint."""
    if iteration is not None:
        return read_checkpoint(iteration_dir(root, iteration), verify)
    return find_resumable(root, writable, verify)


def check_compatible(common: Dict[str, Any], shape: Dict[str, Any],
                     tokenizer: Optional[Dict[str, Any]] = None) -> None:
    """A checkpoint of another model shape or tokenizer is refused before anything is loaded."""
    saved = run_config.stored_shape_keys(common.get("model_shape", {}))
    diff = {k: (saved[k], v) for k, v in shape.items() if k in saved and saved[k] != v}
    if diff:
        detail = ", ".join(f"model.{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"checkpoint {common['path']} is for another model shape ({detail})")
    saved_tok = common.get("tokenizer")
    if tokenizer is not None and saved_tok is not None and saved_tok != tokenizer:
        raise ValueError(
            f"checkpoint {common['path']} was trained with another tokenizer (checkpoint: "
            f"vocabulary {saved_tok.get('vocab_size')}, sha256 {saved_tok.get('sha256', '')[:12]}"
            f"; data.tokenizer: vocabulary {tokenizer['vocab_size']}, sha256 "
            f"{tokenizer['sha256'][:12]}); its embedding rows would mean other tokens")


def check_schedule(common: Dict[str, Any], cfg) -> Dict[str, tuple]:
    """The schedule keys a resume changes ({key: (checkpoint's, config's)}): refused unless
    asked for (Megatron's ``--override-opt_param-scheduler``); with the override the config's
    schedule applies from the resumed iteration."""
    stored = common.get("config") if isinstance(common.get("config"), dict) else {}
    changes = run_config.schedule_changes(stored, cfg)
    if changes and not cfg["checkpoint"]["override_opt_param_scheduler"]:
        diff = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in changes.items())
        raise ValueError(f"checkpoint {common['path']} was trained on another schedule ({diff}); "
                         "resuming would keep the checkpoint's schedule. Set "
                         "checkpoint.override_opt_param_scheduler: true to apply the config's "
                         "from the resumed iteration, or restore those keys")
    return changes
