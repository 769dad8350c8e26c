"""Durable atomic writes on a local disk: a reader sees the old file or the whole new
one, and after a power loss the file is the old one or the new one, never empty.

A rename alone is atomic but not durable: the new file's data may still be in the page
cache when the rename reaches the disk, and a power loss then leaves an empty or short
file under the final name. So the temporary file is fsynced before the rename, and the
directory after it (the rename itself is a change of the directory)."""

from __future__ import annotations

import contextlib
import os
import uuid

TMP_PREFIX = ".tmp-"  # driftloop gc removes crash leftovers with this prefix


def temporary_path(path: str | os.PathLike[str]) -> str:
    """A temporary name beside ``path`` (same directory: the rename stays on one disk)."""
    parent = os.path.dirname(os.fspath(path)) or "."
    return os.path.join(parent, f"{TMP_PREFIX}{uuid.uuid4().hex}")


def write_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` durably and atomically."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    fsync_dir(os.path.dirname(path) or ".")


def replace_durably(tmp: str | os.PathLike[str], path: str | os.PathLike[str]) -> None:
    """Move a fully written temporary file (one a library wrote, e.g. a streamed Parquet
    sink) into place, durably: its data first, then the rename."""
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.fspath(path)) or ".")


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Make a rename or a new entry in ``directory`` durable (a no-op where the
    filesystem cannot fsync a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

