"""Running a kubeos.os collection playbook by its fully qualified name through ansible-runner.

What is set explicitly, and why:

- the ``ansible-playbook`` binary (``binary=``, with the playbook name as its argument): the one from
  the agent's own virtualenv, not whatever ``PATH`` happens to find;
- ``ANSIBLE_COLLECTIONS_PATH`` from the configuration (and no scan of ``sys.path``), so the playbook
  and its modules come from the collection the agent was configured with;
- an inventory of just ``localhost`` with ``ansible_connection: local`` and the agent's Python;
- ``cancel_callback``: passing one keeps ansible-runner from installing its own SIGINT/SIGTERM
  handlers (it only does that when none is given, from the main thread); the daemon keeps its own;
- ``suppress_ansible_output``: the playbook's output goes to the artifacts, not to the daemon's stderr;
- ``rotate_artifacts``: only the last N runs are kept under the artifacts directory;
- ``ANSIBLE_HOME`` and the temp directories under the agent's runtime directory (the systemd unit
  hides /root);
- ``KUBEOS_AGENT_OPERATION=<id>`` in the environment: how cancel and crash recovery find the module
  process, which ansible-playbook's workers detach from the process group (see ``processes``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import processes
from .config import AgentConfig

log = logging.getLogger(__name__)

# How often ansible-runner's loop wakes up to ask cancel_callback while the playbook is silent.
POLL_SECONDS = 0.25
_STANDARD_PATH = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")


@dataclass
class TaskEvent:
    """One runner event that matters to an operation."""

    kind: str  # task_start, ok, changed, failed, skipped, unreachable
    task: str
    action: str
    message: str = ""
    result: dict[str, Any] = field(default_factory=dict)


@dataclass
class PlaybookResult:
    status: str  # successful, failed, canceled, timeout, error
    rc: int | None
    results: dict[str, dict[str, Any]] = field(default_factory=dict)  # last result per module (FQCN)
    failure: str | None = None
    artifact_dir: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "successful"


def _path_env(config: AgentConfig) -> str:
    dirs = [str(config.ansible_playbook.parent), str(config.python_interpreter.parent)]
    dirs += [d for d in os.environ.get("PATH", "").split(os.pathsep) if d]
    dirs += list(_STANDARD_PATH)
    seen: list[str] = []
    for d in dirs:
        if d not in seen:
            seen.append(d)
    return os.pathsep.join(seen)


def _message_of(res: dict[str, Any]) -> str:
    msg = res.get("msg")
    if msg:
        return str(msg)
    for key in ("message", "stderr", "stdout"):
        if res.get(key):
            return str(res[key])
    return ""


class PlaybookRunner:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.private_data_dir = config.artifacts_dir
        self.ansible_home = config.runtime_dir / "ansible"

    def envvars(self, marker: str) -> dict[str, str]:
        home = str(self.ansible_home)
        return {
            "ANSIBLE_COLLECTIONS_PATH": str(self.config.collections_path),
            "ANSIBLE_COLLECTIONS_SCAN_SYS_PATH": "False",
            "ANSIBLE_HOME": home,
            "ANSIBLE_LOCAL_TEMP": os.path.join(home, "tmp"),
            "ANSIBLE_REMOTE_TEMP": os.path.join(home, "tmp"),
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_FORCE_COLOR": "0",
            "ANSIBLE_RETRY_FILES_ENABLED": "False",
            "ANSIBLE_LOCALHOST_WARNING": "False",
            "ANSIBLE_INVENTORY_UNPARSED_WARNING": "False",
            "ANSIBLE_DEPRECATION_WARNINGS": "False",
            "PATH": _path_env(self.config),
            processes.MARKER_ENV: marker,
        }

    def inventory(self) -> dict[str, Any]:
        host = {"ansible_connection": "local", "ansible_python_interpreter": str(self.config.python_interpreter)}
        return {"all": {"hosts": {"localhost": host}}}

    def run(
        self,
        playbook: str,
        extravars: dict[str, Any],
        *,
        ident: str,
        marker: str | None = None,
        on_event: Callable[[TaskEvent], None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
    ) -> PlaybookResult:
        """Run ``playbook`` (a FQCN such as ``kubeos.os.prepare_upgrade``) and wait for it.

        ``ident`` names the artifacts directory; ``marker`` (default ``ident``) is what the processes of the
        run carry in their environment.
        """
        marker = marker or ident
        import ansible_runner  # imported late: it is slow to import and the CLI does not need it

        results: dict[str, dict[str, Any]] = {}
        failures: list[str] = []
        stopped = False

        def event_handler(event: dict[str, Any]) -> bool:
            kind = event.get("event", "")
            data = event.get("event_data") or {}
            task = str(data.get("task", ""))
            action = str(data.get("resolved_action") or data.get("task_action") or "")
            raw_res = data.get("res")
            res: dict[str, Any] = raw_res if isinstance(raw_res, dict) else {}
            mapped: TaskEvent | None = None
            if kind == "playbook_on_task_start":
                mapped = TaskEvent("task_start", task, action)
            elif kind == "runner_on_ok":
                results[action] = res
                mapped = TaskEvent("changed" if res.get("changed") else "ok", task, action, _message_of(res), res)
            elif kind in ("runner_on_failed", "runner_on_unreachable"):
                message = _message_of(res) or kind
                if not data.get("ignore_errors"):
                    failures.append(f"{task}: {message}" if task else message)
                mapped = TaskEvent(
                    "failed" if kind == "runner_on_failed" else "unreachable", task, action, message, res
                )
            elif kind == "runner_on_skipped":
                mapped = TaskEvent("skipped", task, action)
            if mapped is not None and on_event is not None:
                try:
                    on_event(mapped)
                except Exception:  # a broken observer must not break the run
                    log.exception("operation event handler failed")
            return True

        def cancel_callback() -> bool:
            nonlocal stopped
            if should_cancel is None or not should_cancel():
                return False
            if not stopped:
                stopped = True
                processes.stop(marker, self.config.cancel_grace)
            return True

        self.private_data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        (self.ansible_home / "tmp").mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            runner = ansible_runner.run(
                private_data_dir=str(self.private_data_dir),
                ident=ident,
                binary=str(self.config.ansible_playbook),
                cmdline=playbook,
                inventory=self.inventory(),
                extravars=extravars,
                envvars=self.envvars(marker),
                settings={"suppress_ansible_output": True, "pexpect_timeout": POLL_SECONDS},
                quiet=True,
                rotate_artifacts=self.config.artifacts_keep,
                event_handler=event_handler,
                cancel_callback=cancel_callback,
            )
        except Exception as exc:
            log.exception("ansible-runner could not run the playbook", extra={"fields": {"playbook": playbook}})
            return PlaybookResult(status="error", rc=None, failure=f"cannot run {playbook}: {exc}")
        artifact_dir = str(runner.config.artifact_dir)
        status = str(runner.status)
        failure = failures[-1] if failures else None
        if status not in ("successful", "canceled") and failure is None:
            failure = f"{playbook} ended {status} (rc {runner.rc}): {_stdout_tail(artifact_dir)}"
        return PlaybookResult(status=status, rc=runner.rc, results=results, failure=failure, artifact_dir=artifact_dir)


def _stdout_tail(artifact_dir: str, limit: int = 600) -> str:
    try:
        text = Path(artifact_dir, "stdout").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "no output"
    text = " ".join(text.split())
    return text[-limit:] if text else "no output"
