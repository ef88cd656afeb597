# Copyright: kubeos contributors
# Apache License 2.0 (see LICENSE)
"""Applying the planned changes one target at a time, and undoing the ones made when one fails.

Each change knows how to make itself and how to put back what it replaced: a file (atomic replace;
restored from its snapshot, or removed when it did not exist), a /proc/sys setting (its old value written
back), the GRUB environment (the old block written back, atomically). When change N fails, changes
N-1 … 1 are undone in reverse order and :class:`ApplyError` says what failed and what was restored.
"""

from __future__ import annotations

__metaclass__ = type

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from ansible_collections.kubeos.os.plugins.module_utils import atomicfile, grubenv


class ApplyError(Exception):
    """Writing a change failed; the changes made before it were undone (``restored``), except ``unrestored``."""

    def __init__(self, message: str, restored: list[str], unrestored: list[str]) -> None:
        super().__init__(message)
        self.restored = restored
        self.unrestored = unrestored


class Change(Protocol):
    target: str
    model: str

    def apply(self) -> None: ...

    def undo(self) -> None: ...

    def diff(self) -> dict[str, Any]: ...


def _text(data: bytes) -> str:
    return data.decode("utf-8", "replace")


@dataclass
class FileChange:
    target: str  # the path as the node sees it
    host_path: str
    snapshot: atomicfile.Snapshot
    data: bytes
    model: str = ""

    def apply(self) -> None:
        atomicfile.write(self.host_path, self.data, self.snapshot)

    def undo(self) -> None:
        atomicfile.restore(self.snapshot)

    def diff(self) -> dict[str, Any]:
        return {
            "before_header": self.target if self.snapshot.existed else f"{self.target} (absent)",
            "after_header": self.target,
            "before": _text(self.snapshot.data),
            "after": _text(self.data),
        }


@dataclass
class SysctlChange:
    target: str  # /proc/sys/…
    host_path: str
    before: str | None
    after: str
    model: str = ""

    @staticmethod
    def _write(path: str, value: str) -> None:
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(value + "\n")

    def apply(self) -> None:
        self._write(self.host_path, self.after)

    def undo(self) -> None:
        if self.before is not None:
            self._write(self.host_path, self.before)

    def diff(self) -> dict[str, Any]:
        return {
            "before_header": self.target,
            "after_header": self.target,
            "before": "" if self.before is None else self.before + "\n",
            "after": self.after + "\n",
        }


@dataclass
class GrubEnvChange:
    target: str
    before: dict[str, str]
    after: dict[str, str]
    write: Callable[[Mapping[str, str]], None] = field(repr=False)
    model: str = ""

    def apply(self) -> None:
        self.write(self.after)

    def undo(self) -> None:
        self.write(self.before)

    def diff(self) -> dict[str, Any]:
        return {
            "before_header": self.target,
            "after_header": self.target,
            "before": grubenv.render_list(self.before),
            "after": grubenv.render_list(self.after),
        }


def apply_all(changes: list[Change]) -> None:
    """Make every change in order; on a failure undo the ones made and raise ApplyError."""
    done: list[Change] = []
    for change in changes:
        try:
            change.apply()
        except Exception as exc:
            restored: list[str] = []
            unrestored: list[str] = []
            for made in reversed(done):
                try:
                    made.undo()
                    restored.append(made.target)
                except Exception as undo_exc:
                    unrestored.append(f"{made.target} ({undo_exc})")
            message = f"writing {change.target} failed: {exc}"
            if unrestored:
                message += f"; COULD NOT restore {', '.join(unrestored)}: check these by hand" + (
                    f" (restored: {', '.join(restored)})" if restored else ""
                )
            elif restored:
                message += f"; the changes already made were undone ({', '.join(restored)}): nothing is left changed"
            else:
                message += "; it was the first change: nothing is left changed"
            raise ApplyError(message, restored, unrestored) from exc
        done.append(change)
