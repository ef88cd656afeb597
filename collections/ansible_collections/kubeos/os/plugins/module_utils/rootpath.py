# Copyright: kubeos contributors
# Apache License 2.0 (see LICENSE)
"""Resolving a path inside a directory tree as if that tree were ``/``.

Symbolic links (absolute ones included) are followed within the tree and ``..`` never climbs above
its top, so a path that a slot or a configuration names can never lead to the host's own files.
"""

from __future__ import annotations

__metaclass__ = type

import os

MAX_LINKS = 40


class LinkLoopError(ValueError):
    """Too many symbolic links (a loop) while resolving a path."""


def resolve(root: str, path: str, max_links: int = MAX_LINKS) -> str:
    """``path`` with the symbolic links inside ``root`` followed: an absolute path relative to ``root``.

    Parts that do not exist are kept as they are.
    """
    pending = [p for p in path.split("/") if p]
    resolved: list[str] = []
    links = 0
    while pending:
        part = pending.pop(0)
        if part == ".":
            continue
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = os.path.join(root, *resolved, part)
        if os.path.islink(candidate):
            links += 1
            if links > max_links:
                raise LinkLoopError(f"too many levels of symbolic links resolving {path!r}")
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            pending = [p for p in target.split("/") if p] + pending
            continue
        resolved.append(part)
    return "/" + "/".join(resolved)
