"""Finding and stopping every process of one operation, even the ones that left the process tree.

ansible-playbook's workers call ``setsid()``, so killing the playbook's process group (what
ansible-runner does on cancel) leaves the module running, and a module that keeps writing after a
cancel would finally mark the slot bootable. After ``kill -9`` of the agent the module even survives
its parents. So every operation runs with ``KUBEOS_AGENT_OPERATION=<id>`` in its environment, which
ansible passes down to the module process; this file finds processes by that marker.

Stopping is gentle first: SIGINT to the modules (Python turns it into KeyboardInterrupt, so their
``finally`` blocks unmount and detach loop devices; the slot stays marked not bootable by design),
then SIGTERM to what is left, then SIGKILL.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

MARKER_ENV = "KUBEOS_AGENT_OPERATION"


@dataclass(frozen=True)
class Proc:
    pid: int
    cmdline: str

    @property
    def is_module(self) -> bool:
        return "AnsiballZ_" in self.cmdline


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError:
        return None


def find(marker: str) -> list[Proc]:
    """Live processes (not zombies, not this one) whose environment carries ``marker``."""
    needle = f"{MARKER_ENV}={marker}".encode()
    found: list[Proc] = []
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        environ = _read(f"/proc/{entry}/environ")
        if not environ or needle not in environ.split(b"\0"):
            continue
        cmdline = (_read(f"/proc/{entry}/cmdline") or b"").replace(b"\0", b" ").decode("utf-8", "replace")
        found.append(Proc(int(entry), cmdline.strip()))
    return found


def _signal(procs: list[Proc], sig: signal.Signals) -> None:
    for proc in procs:
        try:
            os.kill(proc.pid, sig)
        except ProcessLookupError:
            pass
        except OSError as exc:
            log.warning(
                "cannot signal a process of an operation",
                extra={"fields": {"pid": proc.pid, "signal": sig.name, "error": exc.strerror}},
            )


def _wait_gone(marker: str, pids: set[int], timeout: float) -> set[int]:
    deadline = time.monotonic() + timeout
    while True:
        left = {p.pid for p in find(marker)} & pids
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.05)


def stop(marker: str, grace: float = 15.0) -> list[Proc]:
    """Stop every process of operation ``marker``; return what was found. Blocks until they are gone."""
    procs = find(marker)
    if not procs:
        return []
    log.info(
        "stopping the processes of an operation",
        extra={"fields": {"operation": marker, "pids": [p.pid for p in procs]}},
    )
    modules = [p for p in procs if p.is_module]
    if modules:
        _signal(modules, signal.SIGINT)
        _wait_gone(marker, {p.pid for p in modules}, grace)
    for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
        left = find(marker)
        if not left:
            break
        # Modules that appeared meanwhile get the gentle signal first, too.
        _signal(left, sig)
        _wait_gone(marker, {p.pid for p in left}, wait)
    remaining = find(marker)
    if remaining:
        log.error(
            "processes of an operation survived SIGKILL",
            extra={"fields": {"operation": marker, "pids": [p.pid for p in remaining]}},
        )
    return procs
