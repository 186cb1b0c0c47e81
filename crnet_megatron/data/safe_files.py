"""Writing files into directories other people may have prepared.

Run directories, checkpoints and exports are copied between users and clusters (``tar`` keeps
symbolic links), so a path this project writes may already be a link to somewhere else, or a
FIFO that blocks ``open`` forever. Every file the trainer, the exporter and preprocessing write
goes through here: the target must be absent or a regular file (a link or anything else is
refused with one line naming it); the bytes go to a temporary file created exclusively
(``O_EXCL | O_NOFOLLOW``, a fresh random name) and are renamed over the target, so neither a
planted link at the target nor one at a predictable ``.tmp`` name is ever written through.
No torch.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import stat
from typing import IO, Iterator, Optional

_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)


class UnsafePathError(ValueError):
    """A path this run would write or read is a link or not a regular file."""


def check_target(path: str, what: str = "file") -> None:
    """``path`` is absent or a regular file (not a link, FIFO, device or directory)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISLNK(mode):
        raise UnsafePathError(f"{what} {path} is a symbolic link (to {os.readlink(path)!r}); "
                              "refusing to write through it: remove the link")
    if not stat.S_ISREG(mode):
        raise UnsafePathError(f"{what} {path} exists but is not a regular file; refusing to "
                              "replace it: remove it or choose another path")


def check_readable(path: str, what: str = "file") -> None:
    """A file the run reads is a regular file (a FIFO or device would block or never end)."""
    mode = os.stat(path).st_mode  # links to regular files are fine to read
    if not stat.S_ISREG(mode):
        raise UnsafePathError(f"{what} {path} is not a regular file (a FIFO, device or "
                              "directory); refusing to read it")


@contextlib.contextmanager
def atomic_writer(path: str, what: str = "file", mode: str = "w",
                  perms: int = 0o644) -> Iterator[IO]:
    """Write ``path`` through an exclusive temporary file renamed over it at the end (a failure
    leaves the old file and no temporary one)."""
    check_target(path, what)
    tmp = os.path.join(os.path.dirname(path) or ".",
                       f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, _FLAGS, perms)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        check_target(path, what)  # nobody planted a link meanwhile
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text(path: str, text: str, what: str = "file") -> None:
    with atomic_writer(path, what) as f:
        f.write(text)


def copy_file(src: str, dst: str, what: str = "file") -> None:
    """Copy the regular file ``src`` to ``dst`` (atomically, never through a link)."""
    check_readable(src, what)
    with open(src, "rb") as s, atomic_writer(dst, what, "wb") as d:
        while True:
            chunk = s.read(1 << 20)
            if not chunk:
                break
            d.write(chunk)


def open_append(path: str, what: str = "file") -> IO:
    """Open ``path`` for appending, refusing a link or a non-regular file (``O_NOFOLLOW``)."""
    check_target(path, what)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0),
                 0o644)
    return os.fdopen(fd, "a", encoding="utf-8")


def temporary_path(path: str) -> str:
    """A fresh, unpredictable sibling name for a file written by another library (e.g.
    matplotlib): create it with ``claim`` and rename it over ``path`` afterwards."""
    return os.path.join(os.path.dirname(path) or ".",
                        f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")


def remove_stale_temporaries(path: str, what: str = "file", directories: bool = False) -> None:
    """Remove what a killed writer of ``path`` left: regular files (or, with ``directories``,
    plain directories) named as ``temporary_path`` and ``tempfile.mkdtemp`` name them beside
    ``path`` (``.NAME.<random>.tmp``), with a line. Called only where one writer of ``path`` is
    the rule (a preprocessing output, an export directory)."""
    parent, base = os.path.split(os.path.abspath(path))
    pattern = re.compile(rf"^\.{re.escape(base)}\.[A-Za-z0-9_]{{6,16}}\.tmp$")
    if not os.path.isdir(parent):
        return
    for name in sorted(os.listdir(parent)):
        full = os.path.join(parent, name)
        if not pattern.match(name) or os.path.islink(full):
            continue
        if os.path.isfile(full):
            os.remove(full)
        elif directories and os.path.isdir(full):
            shutil.rmtree(full)
        else:
            continue
        print(f"note: removed {full}, left by an earlier {what} writer that did not finish",
              flush=True)


def claim(tmp: str) -> None:
    """Create ``tmp`` exclusively (so a planted link there makes this fail, not write)."""
    os.close(os.open(tmp, _FLAGS, 0o644))


def replace_into(tmp: str, path: str, what: str = "file") -> None:
    check_target(path, what)
    os.replace(tmp, path)


def loads_json(text, what: str = "JSON"):
    """``json.loads`` that answers a ValueError naming ``what`` for every malformed input,
    nesting too deep for the parser included (a RecursionError otherwise)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError(f"{what} is nested too deeply to be read") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} is not UTF-8 ({e})") from None


def read_json(path: str, what: str = "file", max_bytes: int = 1 << 24):
    """A JSON file the run reads: a regular file of at most ``max_bytes`` (checked while
    reading), parsed with ``loads_json``; ValueError/UnsafePathError name the file."""
    check_readable(path, what)
    with open(path, "rb") as f:
        raw = f.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise ValueError(f"{what} {path} is larger than {max_bytes} bytes")
    try:
        return loads_json(raw, f"{what} {path}")
    except ValueError as e:
        raise ValueError(str(e) if str(e).startswith(what) else f"{what} {path}: {e}") from None


def check_cache_tree(root: str, key: str = "data.cache_dir") -> None:
    """A cache directory shared between runs (and nodes) holds only directories and regular
    files: a symbolic link inside it (dangling ones too) or a FIFO, device or socket is
    refused with one line before anything writes there (megatron-core writes its index caches
    with a plain ``open``, which would follow a planted link). ``root`` itself may be a link
    (a user's choice of where the cache lives)."""
    root = os.path.expanduser(root)
    if not os.path.isdir(root):
        return
    for here, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(here, name)
            try:
                mode = os.lstat(path).st_mode
            except FileNotFoundError:  # renamed or removed by a writer meanwhile
                continue
            if stat.S_ISLNK(mode):
                raise UnsafePathError(f"{key}={root!r} holds a symbolic link {path} (to "
                                      f"{os.readlink(path)!r}); the cache holds only files this "
                                      "project and megatron-core write there: remove it")
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise UnsafePathError(f"{key}={root!r} holds {path}, which is not a regular file "
                                      "(a FIFO, device or socket): remove it")


def bounded_lines(f, limit: int) -> Iterator[Optional[bytes]]:
    """The lines of the binary file ``f``, none read with more than ``limit + 1`` bytes at a
    time: a longer line is skipped in pieces and given as None, never held whole (a received
    file may hold a line of gigabytes)."""
    while True:
        line = f.readline(limit + 1)
        if not line:
            return
        if len(line) > limit and not line.endswith(b"\n"):
            while True:
                rest = f.readline(1 << 20)
                if not rest or rest.endswith(b"\n"):
                    break
            yield None
        else:
            yield line


def is_regular(path: str) -> Optional[bool]:
    """True/False for an existing path (links not followed), None when absent."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except FileNotFoundError:
        return None
