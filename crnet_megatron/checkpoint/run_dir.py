"""Who owns what in a save directory: one run at a time (a lock naming its host and pid), and
retention that removes only checkpoints this run wrote.

A save directory may hold checkpoints of other runs (loaded from elsewhere, copied in, kept by
hand as ``iter_0000002.bak``). Each run carries an id (kept in its checkpoints, so a resumed or
requeued run keeps it); every checkpoint it publishes is recorded in ``MANIFEST``, and
``keep_last`` prunes among exactly those, by exact ``iter_NNNNNNN`` name, never the one
``latest`` names. Everything else in the directory is left as it is. Rank 0 alone calls these.
No torch.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import socket
import time
import uuid
from typing import Dict, List, Optional

from crnet_megatron.data.safe_files import (
    UnsafePathError,
    check_target,
    copy_file,
    is_regular,
    read_json,
    write_text,
)

LOCK = ".crnet-train.lock"
MANIFEST = ".crnet-checkpoints.json"
ITER_DIR = re.compile(r"^iter_(\d{7,})$")  # 8 digits and more from iteration 10^7 on
PARTIAL = re.compile(r"^iter_\d{7,}\.tmp$")  # a save being written
_MAX_SMALL_FILE = 1 << 20

TRACKER = "latest_checkpointed_iteration.txt"  # Megatron's name
# what a run writes into its save directory (besides iter_N/), and what each file is
RUN_FILES = {"config.yaml": "run config", "tokenizer.json": "tokenizer",
             "metrics.jsonl": "metrics file", "metrics.png": "loss plot",
             TRACKER: "checkpoint tracker"}


def new_run_id() -> str:
    return uuid.uuid4().hex


def _read_small_json(path: str, what: str):
    check_target(path, what)
    return read_json(path, what, _MAX_SMALL_FILE)


def check_save_entries(root: str) -> None:
    """What a save writes besides the run files, checked at start-up rather than at the first
    save after hours of training: the retention manifest and the lock files are absent or
    regular files, and a partial save ``iter_N.tmp`` is a directory, not a link or a file."""
    if not os.path.isdir(root):
        return
    for name, what in ((MANIFEST, "checkpoint manifest"), (LOCK, "run lock"),
                       (LOCK + ".guard", "run lock")):
        check_target(os.path.join(root, name), f"{what} (checkpoint.save)")
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if PARTIAL.match(name) and (os.path.islink(path) or not os.path.isdir(path)):
            raise UnsafePathError(f"checkpoint.save={root!r} holds {name}, where a save writes "
                                  "its directory, as a link or a file; remove it")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # someone else's, or not a pid this system can have: not ours to judge
    return True


@contextlib.contextmanager
def _serialised(root: str):
    """One process at a time inspects and takes the lock: an exclusive ``flock`` on a sidecar
    file (never followed if it is a link), so two runs that both find a stale lock cannot both
    take it over."""
    path = os.path.join(root, LOCK + ".guard")
    check_target(path, "run lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the flock


def _holder(root: str, path: str):
    try:
        holder = _read_small_json(path, "run lock")
        return holder, str(holder["host"]), int(holder["pid"])
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise ValueError(f"checkpoint.save={root!r}: its lock file {path} is unreadable ({e});"
                         " if no run is saving there, remove it") from None


def _create_lock(path: str, me: dict) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0),
                 0o644)
    with os.fdopen(fd, "w") as f:
        json.dump(me, f)


def _refusal(root: str, path: str, holder: dict, host: str, pid: int) -> ValueError:
    return ValueError(
        f"checkpoint.save={root!r} is in use by pid {pid} on {host} (since "
        f"{holder.get('started', '?')}); two runs saving into one directory would overwrite "
        f"each other's checkpoints and metrics. If that run is gone, remove {path}")


def acquire_lock(root: str) -> str:
    """Take ``root``'s lock, or stop with one line naming the run that holds it. A lock left by
    a process of this host that is gone (or by this process), or by an earlier attempt of this
    Slurm job (a requeue may land on another node), is taken over, with a line; the takeover
    is serialised (``_serialised``), and creating the lock is atomic (``O_EXCL``)."""
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, LOCK)
    me = dict(host=socket.gethostname(), pid=os.getpid(), job=os.environ.get("SLURM_JOB_ID"),
              started=time.strftime("%Y-%m-%d %H:%M:%S"))
    try:
        _create_lock(path, me)  # no lock there: the common case, nothing else is written
        return path
    except FileExistsError:
        pass
    with _serialised(root):
        if os.path.lexists(path):
            holder, host, pid = _holder(root, path)
            same_job = me["job"] is not None and str(holder.get("job")) == me["job"]
            if not same_job and (host != me["host"] or (pid != me["pid"] and _alive(pid))):
                raise _refusal(root, path, holder, host, pid)
            if pid != me["pid"] or host != me["host"]:
                why = (f"an earlier attempt of Slurm job {me['job']}" if same_job
                       else "that process is gone")
                print(f"note: taking over the lock of pid {pid} on {host} in {root} ({why})",
                      flush=True)
            os.unlink(path)
        try:
            _create_lock(path, me)
        except FileExistsError:  # a run that found no lock took it meanwhile
            raise _refusal(root, path, *_holder(root, path)) from None
    return path


def release_lock(root: str) -> None:
    path = os.path.join(root, LOCK)
    try:
        if is_regular(path) and int(_read_small_json(path, "run lock")["pid"]) == os.getpid():
            os.unlink(path)
    except (ValueError, KeyError, TypeError, OSError):
        pass


def _manifest(root: str) -> Dict[str, str]:
    path = os.path.join(root, MANIFEST)
    if not os.path.lexists(path):
        return {}
    try:
        data = _read_small_json(path, "checkpoint manifest")
    except ValueError as e:
        print(f"note: {e}; no checkpoint is pruned", flush=True)
        return {}
    return {k: v for k, v in data.items() if ITER_DIR.match(str(k)) and isinstance(v, str)} \
        if isinstance(data, dict) else {}


def record_saved(root: str, iteration: int, run_id: str) -> None:
    """``iter_N`` of ``root`` was written by run ``run_id``."""
    data = _manifest(root)
    data[f"iter_{iteration:07d}"] = run_id
    write_text(os.path.join(root, MANIFEST), json.dumps(data, indent=1, sort_keys=True),
               "checkpoint manifest")


def prune(root: str, keep_last: int, run_id: str, latest: Optional[int]) -> List[str]:
    """Remove all but the newest ``keep_last`` checkpoints that run ``run_id`` wrote here
    (exact names, plain directories, never ``latest``); returns what was removed."""
    if keep_last <= 0:
        return []
    data = _manifest(root)
    own = sorted((name for name, rid in data.items() if rid == run_id
                  and os.path.isdir(os.path.join(root, name))
                  and not os.path.islink(os.path.join(root, name))),
                 key=lambda name: int(ITER_DIR.match(name).group(1)))
    removed = []
    for name in own[:-keep_last]:
        if latest is not None and name == f"iter_{latest:07d}":
            continue
        shutil.rmtree(os.path.join(root, name))
        data.pop(name, None)
        removed.append(name)
    if removed:
        write_text(os.path.join(root, MANIFEST), json.dumps(data, indent=1, sort_keys=True),
                   "checkpoint manifest")
    return removed


def foreign_checkpoints(root: str, run_id: str, after: int) -> List[int]:
    """Iterations past ``after`` of checkpoints in ``root`` that run ``run_id`` did not write:
    this run would overwrite them, or ``latest`` would jump between two runs."""
    if not os.path.isdir(root):
        return []
    data = _manifest(root)
    out = []
    for name in os.listdir(root):
        m = ITER_DIR.match(name)
        if m and int(m.group(1)) > after and data.get(name) != run_id:
            out.append(int(m.group(1)))
    return sorted(out)


def refuse_foreign(save: str, run_id: str, iteration: int) -> None:
    """Checkpoints of another run past ``iteration`` in ``save`` would be overwritten (and
    ``latest`` would move between the runs): refused at start."""
    foreign = foreign_checkpoints(save, run_id, iteration)
    if foreign:
        raise ValueError(
            f"checkpoint.save={save!r} holds checkpoints this run did not write at "
            f"iterations {foreign[:5]}{' ...' if len(foreign) > 5 else ''}, past the one it "
            f"starts from ({iteration}): saving there would overwrite them. Choose "
            "another checkpoint.save, or move them away")


def write_run_files(save: str, config_text: str, tokenizer_path: str, iteration: int,
                    schedule_changes: Dict[str, tuple]) -> None:
    """The run's ``config.yaml`` (its history first: earlier starts kept from the previous
    file, and this one with any schedule change it applied) and its tokenizer, which travels
    with the run (export, eval and generation read it)."""
    os.makedirs(save, exist_ok=True)
    path = os.path.join(save, "config.yaml")
    lines = []
    if os.path.isfile(path):
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = [ln for ln in f if ln.startswith("# history: ")]
    what = "started" if iteration == 0 else "resumed"
    change = "; ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in schedule_changes.items())
    lines.append(f"# history: iteration {iteration}: {what}"
                 + (f"; schedule applied: {change}\n" if change else "\n"))
    write_text(path, "".join(lines) + config_text, "run config")
    copy_file(tokenizer_path, os.path.join(save, "tokenizer.json"), "tokenizer")
