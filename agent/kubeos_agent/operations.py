"""Operations: one at a time, each a collection playbook run, journaled from start to end.

``OperationManager.submit`` validates what needs the configuration (certificate names), refuses a
second operation while one runs (:class:`Busy`, 409), records the new operation and runs it in a
worker thread. The worker holds the *disk lock* for the whole operation, so the status reader never
mounts a slot that a module is writing. Progress comes from two places: the runner's events (tasks
started and finished) and, while ``slot_write`` streams, the progress file it replaces twice a second.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import certs, reboot, slotstate
from .config import AgentConfig
from .journal import Journal
from .models import (
    ConfigureRequest,
    MarkGoodRequest,
    Operation,
    OperationKind,
    OperationState,
    Outcome,
    PrepareUpgradeRequest,
    Request,
    RollbackRequest,
    UpgradeRequest,
    new_operation_id,
)
from .runner import PlaybookRunner, TaskEvent

log = logging.getLogger(__name__)

PLAYBOOKS = {
    OperationKind.PREPARE_UPGRADE: "kubeos.os.prepare_upgrade",
    OperationKind.UPGRADE: "kubeos.os.upgrade",
    OperationKind.ROLLBACK: "kubeos.os.rollback",
    OperationKind.MARK_GOOD: "kubeos.os.mark_good",
    OperationKind.CONFIGURE: "kubeos.os.configure",
}
# The tree that configure changes: "/" on a node; tests and image builds point it elsewhere.
# Phases in which cancelling makes no sense any more (the reboot was asked for) or is not offered.
_NOT_CANCELLABLE_PHASES = ("rebooting",)
PROGRESS_POLL = 0.2


class Busy(Exception):
    """Another operation runs (409)."""

    def __init__(self, running: Operation) -> None:
        super().__init__(f"operation {running.id} ({running.kind.value}) is running, phase {running.phase}")
        self.running = running


class NotFound(Exception):
    """No such operation (404)."""


class Conflict(Exception):
    """The operation cannot do what was asked in its current state (409)."""


class OperationFailed(Exception):
    """The operation failed; the message is what the user reads."""


class Canceled(Exception):
    """The operation was cancelled."""


Work = Callable[[Operation], None]


@dataclass
class DiskStatus:
    view: slotstate.DiskView | None
    error: str | None
    stale: bool


class OperationManager:
    def __init__(self, config: AgentConfig, journal: Journal, runner: PlaybookRunner | None = None) -> None:
        self.config = config
        self.journal = journal
        self.runner = runner or PlaybookRunner(config)
        self._lock = threading.RLock()
        self._disk_lock = threading.Lock()
        self._current: Operation | None = None
        self._thread: threading.Thread | None = None
        self._view: slotstate.DiskView | None = None
        self._view_error: str | None = None
        self._view_dirty = True
        self._stopping = False
        self._non_cancellable: set[str] = set()
        self._runs: dict[str, int] = {}

    # --- queries -----------------------------------------------------------------------------------

    def current(self) -> Operation | None:
        with self._lock:
            return self._current

    def describe(self, op: Operation, *, events: int | None = None) -> dict[str, Any]:
        with self._lock:
            return op.to_dict(events=events)

    def get(self, op_id: str) -> Operation:
        with self._lock:
            if self._current is not None and self._current.id == op_id:
                return self._current
        op = self.journal.read(op_id)
        if op is None:
            raise NotFound(f"no operation {op_id!r}")
        return op

    def recent(self, limit: int = 20) -> list[Operation]:
        ops = {op.id: op for op in self.journal.recent(limit)}
        with self._lock:
            if self._current is not None:
                ops[self._current.id] = self._current
        return sorted(ops.values(), key=lambda op: (op.created, op.id))[-limit:]

    def disk(self, *, refresh: bool = True) -> DiskStatus:
        """The disk as last read; read again now when no operation holds the disk, ``refresh`` is asked
        and the last reading is older than ``status_max_age`` (or an operation ended since)."""
        view = self._view
        fresh = view is not None and not self._view_dirty and time.time() - view.taken < self.config.status_max_age
        if fresh:
            return DiskStatus(view, self._view_error, False)
        if refresh and self._disk_lock.acquire(blocking=False):
            try:
                self._read_disk_locked()
            finally:
                self._disk_lock.release()
            return DiskStatus(self._view, self._view_error, False)
        return DiskStatus(self._view, self._view_error, True)

    def _read_disk_locked(self) -> slotstate.DiskView | None:
        try:
            self._view = slotstate.read(self.config)
            self._view_error = None
        except slotstate.DiskReadError as exc:
            self._view_error = str(exc)
        self._view_dirty = False
        return self._view

    def read_disk(self) -> slotstate.DiskView:
        """For workers that hold the disk lock: the disk now, or OperationFailed."""
        view = self._read_disk_locked()
        if view is None or self._view_error:
            raise OperationFailed(f"cannot read the disk: {self._view_error}")
        return view

    # --- starting, cancelling, stopping --------------------------------------------------------------

    def submit(self, request: Request) -> Operation:
        """Start the operation ``request`` asks for (RequestError: 400, Busy: 409)."""
        work: Work
        recorded: Request = request
        if isinstance(request, PrepareUpgradeRequest):
            paths = {
                name: certs.resolve(self.config.cert_dir, getattr(request, name), name)
                for name in ("cacert", "clientcert", "clientkey")
                if getattr(request, name)
            }

            def work(op: Operation) -> None:
                self._prepare_upgrade(op, request, paths)

        elif isinstance(request, UpgradeRequest):
            recorded = upgrade = self._with_cert_paths(request)

            def work(op: Operation) -> None:
                self._upgrade(op, upgrade)

        elif isinstance(request, RollbackRequest):

            def work(op: Operation) -> None:
                self._rollback(op, request)

        elif isinstance(request, MarkGoodRequest):

            def work(op: Operation) -> None:
                self._mark_good(op)

        elif isinstance(request, ConfigureRequest):

            def work(op: Operation) -> None:
                self._configure(op, request)

        else:  # pragma: no cover - parse_request only returns the types above
            raise TypeError(f"unknown request {request!r}")
        return self.start(OperationKind(request.operation), recorded.redacted(), work)

    def _with_cert_paths(self, request: UpgradeRequest) -> UpgradeRequest:
        """The request with its HTTP health checks' certificate names resolved inside the certificate directory
        (400 for a name outside it), so the journal holds the files the checks will read after the reboot."""
        if request.health is None or not request.health.http:
            return request
        probes = []
        for i, probe in enumerate(request.health.http):
            paths = {
                name: certs.resolve(self.config.cert_dir, str(getattr(probe, name)), f"health.http.{i}.{name}")
                for name in ("cacert", "clientcert", "clientkey")
                if getattr(probe, name) is not None
            }
            probes.append(probe.model_copy(update=paths))
        health = request.health.model_copy(update={"http": probes})
        return request.model_copy(update={"health": health})

    def start(self, kind: OperationKind, request: dict[str, Any], work: Work, *, cancellable: bool = True) -> Operation:
        with self._lock:
            if self._stopping:
                raise Conflict("the agent is stopping; try again when it is back")
            if self._current is not None:
                raise Busy(self._current)
            op = Operation(id=new_operation_id(), kind=kind, request=request, agent_pid=os.getpid())
            op.add_event("queued", f"{kind.value} accepted")
            self.journal.write(op)
            if not cancellable:
                self._non_cancellable.add(op.id)
            self._current = op
            self._thread = threading.Thread(target=self._execute, args=(op, work), name=f"op-{kind.value}")
            self._thread.start()
        log.info("operation accepted", extra={"fields": {"operation": op.id, "kind": kind.value}})
        return op

    def cancel(self, op_id: str) -> Operation:
        with self._lock:
            op = self._current if self._current is not None and self._current.id == op_id else None
            if op is None:
                found = self.get(op_id)  # NotFound for unknown ids
                raise Conflict(f"operation {op_id} is {found.state.value}; only a running operation can be cancelled")
            if op.id in self._non_cancellable:
                raise Conflict(f"operation {op_id} ({op.kind.value}) cannot be cancelled; it ends by itself")
            if op.phase in _NOT_CANCELLABLE_PHASES:
                raise Conflict(f"operation {op_id} is {op.phase}: too late to cancel")
            if not op.cancel_requested:
                op.cancel_requested = True
                op.add_event("cancel", "cancel requested")
                log.info("cancel requested", extra={"fields": {"operation": op.id}})
            return op

    def wait_idle(self, timeout: float | None = None) -> bool:
        with self._lock:
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
            return not thread.is_alive()
        return True

    def shutdown(self, timeout: float) -> None:
        """Stop taking operations; cancel a running one and wait for it (journaled interrupted if it hangs)."""
        with self._lock:
            self._stopping = True
            op = self._current
            if op is not None and op.id not in self._non_cancellable and op.phase not in _NOT_CANCELLABLE_PHASES:
                op.cancel_requested = True
                op.add_event("cancel", "the agent is stopping")
        if op is None:
            return
        if not self.wait_idle(timeout):
            with self._lock:
                self.journal.mark_interrupted(op, "the agent stopped while the operation ran")

    # --- the worker ----------------------------------------------------------------------------------

    def _save(self, op: Operation) -> None:
        with self._lock:
            self.journal.write(op)

    def note(self, op: Operation, kind: str, message: str, task: str = "") -> None:
        """Add an event to ``op`` (shown by GET /v1/operations/{id})."""
        with self._lock:
            op.add_event(kind, message, task)

    def set_result(self, op: Operation, result: dict[str, Any]) -> None:
        with self._lock:
            op.result = result

    def set_phase(self, op: Operation, phase: str, *, save: bool = True) -> None:
        with self._lock:
            if op.phase == phase:
                return
            op.phase = phase
            if save:
                self.journal.write(op)

    def _execute(self, op: Operation, work: Work) -> None:
        try:
            with self._disk_lock:
                self._work(op, work)
        except Exception:
            # Only the journal can fail here (a full or broken PERSIST); the operation has ended either way.
            log.exception("cannot record the end of an operation", extra={"fields": {"operation": op.id}})
        finally:
            self._view_dirty = True
            with self._lock:
                if self._current is op:
                    self._current = None
                self._non_cancellable.discard(op.id)
                self._runs.pop(op.id, None)

    def _work(self, op: Operation, work: Work) -> None:
        try:
            with self._lock:
                op.state = OperationState.RUNNING
                op.started = time.time()
                op.phase = "starting"
                self.journal.write(op)
            work(op)
            if op.cancel_requested and op.kind == OperationKind.PREPARE_UPGRADE:
                # The write ended before the cancel reached it; the slot is complete and verified.
                self.note(op, "cancel", "the operation had finished before the cancel took effect")
        except Canceled as exc:
            self._finish(op, OperationState.CANCELED, str(exc) or "cancelled")
        except OperationFailed as exc:
            self._finish(op, OperationState.FAILED, str(exc))
        except Exception as exc:
            log.exception("operation crashed", extra={"fields": {"operation": op.id}})
            self._finish(op, OperationState.FAILED, f"internal error in the agent: {exc!r}")
        else:
            self._finish(op, OperationState.SUCCEEDED, None)
        self.journal.prune()

    def _finish(self, op: Operation, state: OperationState, error: str | None) -> None:
        with self._lock:
            op.state = state
            op.error = error
            op.finished = time.time()
            op.phase = state.value
            op.add_event(state.value, error or f"{op.kind.value} {state.value}")
            self.journal.write(op)
        fields = {"operation": op.id, "kind": op.kind.value, "state": state.value}
        if error:
            fields["error"] = error
        log.log(logging.INFO if state == OperationState.SUCCEEDED else logging.WARNING, "operation ended",
                extra={"fields": fields})  # fmt: skip

    def run_playbook(
        self,
        op: Operation,
        kind: OperationKind,
        extravars: dict[str, Any],
        *,
        progress_file: Path | None = None,
        retries: int = 0,
    ) -> dict[str, dict[str, Any]]:
        """Run the playbook of ``kind`` for ``op``; return the last result of each module, or raise.

        ``retries``: run a failed (not cancelled) playbook again, for idempotent steps the agent takes on
        its own after a boot, where nobody is there to retry.
        """
        for attempt in range(retries + 1):
            try:
                return self._run_playbook_once(op, kind, extravars, progress_file=progress_file)
            except OperationFailed as exc:
                if attempt >= retries:
                    raise
                self.note(op, "retry", f"{exc}; trying again")
                log.warning("playbook failed; retrying", extra={"fields": {"operation": op.id, "error": str(exc)}})
                time.sleep(1.0)
        raise AssertionError("unreachable")  # pragma: no cover

    def _run_playbook_once(
        self, op: Operation, kind: OperationKind, extravars: dict[str, Any], *, progress_file: Path | None
    ) -> dict[str, dict[str, Any]]:
        playbook = PLAYBOOKS[kind]
        with self._lock:
            self._runs[op.id] = self._runs.get(op.id, 0) + 1
            ident = op.id if self._runs[op.id] == 1 else f"{op.id}.{self._runs[op.id]}"
            op.artifacts = str(self.config.artifacts_dir / "artifacts" / ident)
            op.add_event("playbook", f"running {playbook}")
        self.set_phase(op, "running " + playbook.rsplit(".", 1)[-1])
        stop_polling = threading.Event()
        poller: threading.Thread | None = None
        if progress_file is not None:
            poller = threading.Thread(
                target=self._poll_progress, args=(op, progress_file, stop_polling), name="progress", daemon=True
            )
            poller.start()

        def on_event(event: TaskEvent) -> None:
            with self._lock:
                if event.kind == "task_start":
                    op.add_event("task", "started", event.task)
                elif event.kind == "skipped":
                    op.add_event("skipped", "skipped", event.task)
                elif event.kind in ("ok", "changed", "failed", "unreachable"):
                    op.add_event(event.kind, event.message[:500], event.task)
                log.info(
                    "task " + event.kind,
                    extra={"fields": {"operation": op.id, "task": event.task, "message": event.message[:300]}},
                )

        try:
            result = self.runner.run(
                playbook,
                extravars,
                ident=ident,
                marker=op.id,
                on_event=on_event,
                should_cancel=lambda: op.cancel_requested,
            )
        finally:
            stop_polling.set()
            if poller is not None:
                poller.join(timeout=2)
            if progress_file is not None:
                self._read_progress(op, progress_file)
                with contextlib.suppress(OSError):
                    progress_file.unlink()
        if result.status == "canceled" or (op.cancel_requested and not result.ok):
            what = (
                " before it finished"
                if kind != OperationKind.PREPARE_UPGRADE
                else ("; the slot that was being written is left not bootable")
            )
            raise Canceled("cancelled" + what)
        if not result.ok:
            raise OperationFailed(result.failure or f"{playbook} failed")
        return result.results

    def _poll_progress(self, op: Operation, path: Path, stop: threading.Event) -> None:
        while not stop.wait(PROGRESS_POLL):
            self._read_progress(op, path)

    def _read_progress(self, op: Operation, path: Path) -> None:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        if not isinstance(data, dict):
            return
        with self._lock:
            phase = str(data.get("phase") or op.progress.phase)
            if phase != op.progress.phase:
                op.add_event("progress", phase)
            op.progress.phase = phase
            if isinstance(data.get("bytes_done"), int):
                op.progress.bytes_done = data["bytes_done"]
            if isinstance(data.get("bytes_total"), int) or data.get("bytes_total") is None:
                op.progress.bytes_total = data.get("bytes_total")
            if phase in ("connecting", "writing", "verifying") and op.phase != phase:
                op.phase = phase
                self.journal.write(op)  # a few times per operation: the journal knows how far it got

    def disk_vars(self, prefix: str) -> dict[str, Any]:
        return {
            f"{prefix}_device": self.config.device or "",
            f"{prefix}_running_root": self.config.running_root or "",
        }

    def reboot_node(self, op: Operation, what: str) -> None:
        with self._lock:
            if op.cancel_requested:
                raise Canceled(f"cancelled before the reboot; {what} and takes effect at the next restart")
            op.phase = "rebooting"
            op.add_event("reboot", "running " + " ".join(self.config.reboot_command))
            self.journal.write(op)
        try:
            reboot.reboot(self.config.reboot_command)
        except reboot.RebootError as exc:
            raise OperationFailed(f"{what}, but {exc}; reboot the node to complete it") from exc

    # --- the operations ------------------------------------------------------------------------------

    def _prepare_upgrade(self, op: Operation, request: PrepareUpgradeRequest, paths: dict[str, Path]) -> None:
        self.config.runtime_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        progress_file = self.config.runtime_dir / f"progress-{op.id}.json"
        extravars: dict[str, Any] = {
            **self.disk_vars("kubeos_upgrade"),
            # imagetype docker/containerd: oci://<containerimage>, pulled from the registry by digest (the
            # checksum); cacert and the mtls client certificate apply to the registry connection.
            "kubeos_upgrade_image_src": request.image_src,
            "kubeos_upgrade_image_sha256": request.sha256,
            "kubeos_upgrade_image_format": request.format,
            "kubeos_upgrade_ca_cert": str(paths.get("cacert", "")),
            "kubeos_upgrade_client_cert": str(paths.get("clientcert", "")),
            "kubeos_upgrade_client_key": str(paths.get("clientkey", "")),
            "kubeos_upgrade_allow_insecure_http": request.flagSafe,
            "kubeos_upgrade_timeout": int(self.config.download_timeout),
            "kubeos_upgrade_progress_file": str(progress_file),
        }
        results = self.run_playbook(op, OperationKind.PREPARE_UPGRADE, extravars, progress_file=progress_file)
        res = results.get("kubeos.os.slot_write", {})
        result = {
            key: res.get(key) for key in ("slot", "device", "bytes_written", "seconds", "sha256", "version", "message")
        }
        if request.is_container_image:
            result["image"] = res.get("image")
            result["layers"] = res.get("layers")
        result["changed"] = bool(res.get("changed"))
        if request.version:
            written = str(res.get("version") or "")
            # KubeOS names versions by PRETTY_NAME ("KubeOS v2"); the slot reports VERSION_ID ("v2").
            matches = bool(written) and (request.version == written or written in request.version.split())
            result["version_matches"] = matches
            if not matches:
                op.add_event("warning", f"slot holds version {written!r}, the request named {request.version!r}")
        with self._lock:
            op.result = result
            if res.get("bytes_written"):
                op.progress.bytes_done = res["bytes_written"]
                op.progress.bytes_total = op.progress.bytes_total or res["bytes_written"]
            op.progress.phase = "done"

    def _upgrade(self, op: Operation, request: UpgradeRequest) -> None:
        before = self.read_disk()
        target = before.inactive_slot
        slot = before.slots[target]
        if request.version and request.version not in (slot.version, slot.pretty_name):
            raise OperationFailed(
                f"slot {target} holds {slot.pretty_name or 'no OS'} (version {slot.version or 'none'}), "
                f"not {request.version}; run prepare_upgrade with that image first"
            )
        tries = request.tries or self.config.trial_tries
        extravars = {**self.disk_vars("kubeos_upgrade"), "kubeos_upgrade_tries": tries}
        results = self.run_playbook(op, OperationKind.UPGRADE, extravars)
        res = results.get("kubeos.os.boot_slot", {})
        grub = res.get("grub") or {}
        trial = str(res.get("slot") or target)
        with self._lock:
            op.result = {
                "trial_slot": trial,
                "from_slot": grub.get("default", before.default),
                "running_slot": before.running_slot,
                "tries": tries,
                "version": before.slots[trial].version,
                "pretty_name": before.slots[trial].pretty_name,
                "message": res.get("message"),
            }
            op.outcome = Outcome.PENDING_REBOOT
            op.outcome_detail = f"slot {trial} boots on trial at the next restart"
            self.journal.write(op)
        if request.reboot:
            self.reboot_node(op, f"the trial boot of slot {trial} is armed")

    def _rollback(self, op: Operation, request: RollbackRequest) -> None:
        before = self.read_disk()
        results = self.run_playbook(op, OperationKind.ROLLBACK, self.disk_vars("kubeos_rollback"))
        res = results.get("kubeos.os.boot_slot", {})
        slot = str(res.get("slot") or "")
        with self._lock:
            op.result = {
                "slot": slot,
                "from_slot": before.running_slot or before.default,
                "version": before.slots[slot].version if slot in before.slots else "",
                "message": res.get("message"),
            }
            op.outcome = Outcome.PENDING_REBOOT
            op.outcome_detail = f"slot {slot} boots at the next restart"
            self.journal.write(op)
        if request.reboot:
            self.reboot_node(op, f"slot {slot} is committed")

    def _mark_good(self, op: Operation) -> None:
        results = self.run_playbook(op, OperationKind.MARK_GOOD, self.disk_vars("kubeos_mark_good"))
        res = results.get("kubeos.os.boot_slot", {})
        slot = str(res.get("slot") or "")
        with self._lock:
            op.result = {"slot": slot, "changed": bool(res.get("changed")), "message": res.get("message")}
        self.settle_upgrade(slot, Outcome.COMMITTED, f"slot {slot} committed by mark_good ({op.id})")

    def _configure(self, op: Operation, request: ConfigureRequest) -> None:
        configs = request.configs_document()
        extravars: dict[str, Any] = {
            **self.disk_vars("kubeos_configure"),
            # As base64 JSON: Ansible would evaluate "{{ }}" in values passed as plain extra vars.
            "kubeos_configure_configs_b64": base64.b64encode(json.dumps(configs).encode("utf-8")).decode("ascii"),
            "kubeos_configure_root": str(self.config.configure_root),
            "kubeos_configure_reload_sysctl": request.reload_sysctl,
            "kubeos_configure_restart_kubelet": request.restart_kubelet,
            "kubeos_configure_restart_containerd": request.restart_containerd,
            "kubeos_configure_check": request.dry_run,
        }
        results = self.run_playbook(op, OperationKind.CONFIGURE, extravars)
        res = results.get("kubeos.os.sysconfig", {})
        applied = res.get("results") or []
        changed = [
            f"{entry.get('model')} {item.get('key')}"
            for entry in applied
            for item in entry.get("contents") or []
            if item.get("changed")
        ]
        with self._lock:
            # What was applied and what it replaced (each content's before/after): the journal keeps it.
            op.result = {
                "version": request.version,
                "dry_run": request.dry_run,
                "changed": bool(res.get("changed")),
                "applied": applied,
                "changed_targets": res.get("changed_targets") or [],
                "actions": res.get("actions") or [],
                "message": (
                    ("would change " if request.dry_run else "changed ") + ", ".join(changed)
                    if changed
                    else "nothing to change"
                ),
            }
            op.progress.phase = "done"

    def settle_upgrade(self, slot: str, outcome: Outcome, detail: str) -> Operation | None:
        """Record how the last upgrade (still waiting for its reboot) ended, if it was about ``slot``."""
        last = self.journal.last_of(OperationKind.UPGRADE)
        if last is None or last.outcome != Outcome.PENDING_REBOOT or last.result.get("trial_slot") != slot:
            return None
        last.outcome = outcome
        last.outcome_detail = detail
        last.add_event("outcome", f"{outcome.value}: {detail}")
        self._save(last)
        log.info(
            "upgrade settled", extra={"fields": {"operation": last.id, "outcome": outcome.value, "detail": detail}}
        )
        return last
