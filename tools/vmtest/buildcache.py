"""What the image builders (testos/build.py, nodeos/build.py) share about their caches: one builder at a time
per cache directory, and a cached build that counts only when its stamp and every file it lists are there."""

from __future__ import annotations

import contextlib
import fcntl
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def locked(cache: Path) -> Iterator[None]:
    """Hold ``cache/.lock`` exclusively (another build of the same cache waits)."""
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def load_manifest(directory: Path, want_stamp: str) -> dict[str, Any] | None:
    """``directory/manifest.json`` when it was built from ``want_stamp`` and every file it lists is there with
    the size it lists; otherwise None (build again)."""
    try:
        manifest: dict[str, Any] = json.loads((directory / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("stamp") != want_stamp:
        return None
    for entry in manifest.get("files", {}).values():
        path = directory / entry["name"]
        if not path.is_file() or ("size" in entry and path.stat().st_size != entry["size"]):
            return None
    return manifest
