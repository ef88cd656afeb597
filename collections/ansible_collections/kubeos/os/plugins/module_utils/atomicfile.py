# Copyright: kubeos contributors
# Apache License 2.0 (see LICENSE)
"""Replacing a file atomically, keeping its owner and mode, and putting it back.

A new version is written to a temporary file in the same directory, flushed to disk, given the old
file's mode and owner, renamed over the old file, and the directory is flushed: a crash leaves the old
file or the new one, never a mix. A :class:`Snapshot` taken before remembers the bytes, mode and owner
(or that there was no file), so a change can be undone the same way.
"""

from __future__ import annotations

__metaclass__ = type

import contextlib
import errno
import os
import stat
import tempfile
from dataclasses import dataclass

DEFAULT_MODE = 0o644


@dataclass(frozen=True)
class Snapshot:
    path: str
    existed: bool
    data: bytes = b""
    mode: int = DEFAULT_MODE
    uid: int = -1
    gid: int = -1


def snapshot(path: str) -> Snapshot:
    """What ``path`` holds now (a regular file or nothing)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        return Snapshot(path=path, existed=False)
    with os.fdopen(fd, "rb") as handle:
        st = os.fstat(handle.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, f"{path} is not a regular file")
        data = handle.read()
    return Snapshot(path=path, existed=True, data=data, mode=stat.S_IMODE(st.st_mode), uid=st.st_uid, gid=st.st_gid)


def fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as exc:  # pragma: no cover - some filesystems cannot sync a directory
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def write(path: str, data: bytes, like: Snapshot) -> None:
    """Replace ``path`` with ``data`` atomically, with the mode and owner of ``like`` (new files: 0644)."""
    directory = os.path.dirname(path) or "."
    fd, temp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".kubeos-tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fchmod(handle.fileno(), like.mode if like.existed else DEFAULT_MODE)
            if like.existed:
                mine = os.fstat(handle.fileno())
                if (mine.st_uid, mine.st_gid) != (like.uid, like.gid):
                    os.fchown(handle.fileno(), like.uid, like.gid)
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    fsync_dir(directory)


def restore(snap: Snapshot) -> None:
    """Put back what :func:`snapshot` saw: the old bytes, mode and owner, or no file at all."""
    if snap.existed:
        write(snap.path, snap.data, snap)
        return
    with contextlib.suppress(FileNotFoundError):
        os.unlink(snap.path)
        fsync_dir(os.path.dirname(snap.path) or ".")


def replace(path: str, data: bytes) -> None:
    """Write ``path`` atomically, keeping the mode and owner of the file it replaces (new files: 0644)."""
    write(path, data, snapshot(path))
