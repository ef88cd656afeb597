"""Rebooting the node: the configured command, run by the agent itself, never inside a playbook run.

The playbook has finished and its result is journaled before this runs, so a reboot can never cut an
ansible run (or the journal) in half. ``systemctl reboot`` only queues the reboot and returns; systemd
then stops the agent with SIGTERM like every other service.
"""

from __future__ import annotations

import logging
import subprocess

log = logging.getLogger(__name__)


class RebootError(Exception):
    """The reboot command failed; the message says how."""


def reboot(command: list[str], timeout: float = 120.0) -> None:
    log.warning("rebooting the node", extra={"fields": {"command": command}})
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError as exc:
        raise RebootError(f"the reboot command {command[0]} was not found") from exc
    except subprocess.TimeoutExpired as exc:
        raise RebootError(f"the reboot command {' '.join(command)} did not finish within {timeout:g}s") from exc
    except OSError as exc:
        raise RebootError(f"cannot run the reboot command {command[0]}: {exc.strerror}") from exc
    if proc.returncode != 0:
        output = " ".join((proc.stderr or proc.stdout).split())[-300:]
        raise RebootError(f"the reboot command {' '.join(command)} failed (exit {proc.returncode}): {output}")
