"""The operation journal on PERSIST: one JSON file per operation, replaced atomically on every change.

It is what lets the agent finish what it started across a crash or a reboot: on start-up, an operation
still recorded as running was interrupted, and the last upgrade tells what the boot should prove.
Writes are atomic (temporary file, fsync, rename, fsync of the directory) so a power cut leaves either
the old record or the new one, never half of one. Old records beyond ``keep`` are pruned.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import threading
import time
from pathlib import Path

from .models import OPERATION_ID, Operation, OperationKind, OperationState

log = logging.getLogger(__name__)

SUFFIX = ".json"


class JournalError(Exception):
    """The journal cannot be written; the agent refuses to run operations it could not record."""


class Journal:
    def __init__(self, directory: Path, keep: int = 200) -> None:
        self.directory = directory
        self.keep = keep
        self._lock = threading.RLock()
        # Only this process writes the journal: after the first read, records are served from memory.
        self._cache: dict[str, Operation] | None = None

    def prepare(self) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise JournalError(f"cannot create the journal directory {self.directory}: {exc.strerror}") from exc

    def _path(self, op_id: str) -> Path:
        if not OPERATION_ID.match(op_id):
            raise JournalError(f"refusing to journal an operation with the malformed id {op_id!r}")
        return self.directory / f"{op_id}{SUFFIX}"

    def write(self, op: Operation) -> None:
        """Record ``op`` as it is now (atomically)."""
        data = json.dumps(op.to_dict(), indent=1, sort_keys=True).encode("utf-8")
        path = self._path(op.id)
        with self._lock:
            cache = self._loaded()
            try:
                fd, tmp = tempfile.mkstemp(prefix=f".{op.id}.", suffix=".tmp", dir=self.directory)
                try:
                    with os.fdopen(fd, "wb") as handle:
                        handle.write(data)
                        handle.flush()
                        os.fsync(handle.fileno())
                    os.replace(tmp, path)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)
                    raise
                dir_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.fsync(dir_fd)
                finally:
                    os.close(dir_fd)
            except OSError as exc:
                raise JournalError(f"cannot write the journal record {path}: {exc.strerror}") from exc
            cache[op.id] = op

    def read(self, op_id: str) -> Operation | None:
        if not OPERATION_ID.match(op_id):
            return None
        with self._lock:
            return self._loaded().get(op_id)

    def _load(self, path: Path) -> Operation | None:
        try:
            return Operation.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("skipping unreadable journal record", extra={"fields": {"path": str(path), "error": str(exc)}})
            return None

    def _loaded(self) -> dict[str, Operation]:
        if self._cache is None:
            try:
                names = sorted(p for p in self.directory.iterdir() if p.suffix == SUFFIX and not p.name.startswith("."))
            except FileNotFoundError:
                names = []
            self._cache = {op.id: op for op in (self._load(p) for p in names) if op is not None}
        return self._cache

    def all(self) -> list[Operation]:
        """Every readable record, oldest first."""
        with self._lock:
            ops = list(self._loaded().values())
        ops.sort(key=lambda op: (op.created, op.id))
        return ops

    def recent(self, limit: int = 20) -> list[Operation]:
        return self.all()[-limit:]

    def last_of(self, *kinds: OperationKind) -> Operation | None:
        for op in reversed(self.all()):
            if op.kind in kinds:
                return op
        return None

    def unfinished(self) -> list[Operation]:
        return [op for op in self.all() if not op.state.final]

    def prune(self) -> None:
        """Drop the oldest finished records beyond ``keep``; the last upgrade is always kept."""
        ops = self.all()
        excess = len(ops) - self.keep
        if excess <= 0:
            return
        last_upgrade = self.last_of(OperationKind.UPGRADE)
        for op in ops:
            if excess <= 0:
                break
            if not op.state.final or (last_upgrade and op.id == last_upgrade.id):
                continue
            with contextlib.suppress(OSError):
                self._path(op.id).unlink()
            with self._lock:
                self._loaded().pop(op.id, None)
            excess -= 1

    def mark_rebooted(self, op: Operation) -> Operation:
        """An operation that had asked for the reboot when the node went down: it did what it was asked."""
        op.state = OperationState.SUCCEEDED
        op.error = None
        op.phase = "done"
        op.add_event("reboot", "the node restarted as the operation asked")
        op.finished = op.finished or time.time()
        self.write(op)
        return op

    def mark_interrupted(self, op: Operation, reason: str) -> Operation:
        op.state = OperationState.INTERRUPTED
        op.error = reason
        op.phase = "interrupted"
        op.finished = op.finished or time.time()
        self.write(op)
        return op
