"""What the agent does when it starts: finish what the last run of the agent (or the last boot) left.

1. Operations the journal still shows running were interrupted (the agent died, or the node went down):
   their leftover processes are stopped (the slot they wrote stays not bootable, by the module's
   design) and they are recorded ``interrupted``.
2. The node booted a trial slot (GRUB's ``kubeos_trial`` is the running slot): run the health checks,
   then commit it (``kubeos.os.mark_good``) or end the trial (``kubeos.os.rollback`` to the committed
   slot) and reboot into the old slot. This runs as the operation ``verify_upgrade``, so the API shows it
   and refuses other operations meanwhile.
3. The node runs the old slot and GRUB recorded ``kubeos_trial_failed`` for the trial slot: GRUB used
   up the tries and fell back by itself; the upgrade is recorded as failed (``fell-back``).
"""

from __future__ import annotations

import logging

from pydantic import ValidationError

from . import health, processes
from .config import HealthConfig
from .models import Operation, OperationKind, Outcome
from .operations import OperationFailed, OperationManager

log = logging.getLogger(__name__)


def recover_interrupted(manager: OperationManager) -> list[Operation]:
    """Stop the leftovers of operations that were running when the agent died; journal them interrupted."""
    interrupted: list[Operation] = []
    for op in manager.journal.unfinished():
        if op.phase == "rebooting":
            # The playbook had finished and its result was journaled; the reboot it asked for took the agent
            # down before the operation's end was written. It succeeded; reconcile() reads its outcome.
            manager.journal.mark_rebooted(op)
            log.info("operation ended with the reboot it asked for", extra={"fields": {"operation": op.id}})
            continue
        leftovers = processes.stop(op.id, manager.config.cancel_grace)
        reason = f"the agent (pid {op.agent_pid}) stopped while the operation was {op.phase}"
        if leftovers:
            reason += f"; stopped {len(leftovers)} leftover process(es)"
        if op.kind == OperationKind.PREPARE_UPGRADE:
            reason += "; the slot it wrote is left not bootable: run prepare_upgrade again"
        manager.journal.mark_interrupted(op, reason)
        log.warning("operation interrupted", extra={"fields": {"operation": op.id, "kind": op.kind.value}})
        interrupted.append(op)
    return interrupted


def reconcile(manager: OperationManager) -> Operation | None:
    """Act on the boot that just happened; return the verify_upgrade operation when one was started."""
    status = manager.disk(refresh=True)
    view = status.view
    if view is None:
        log.error("cannot read the disk at start-up", extra={"fields": {"error": status.error}})
        return None
    journal = manager.journal
    last_rollback = journal.last_of(OperationKind.ROLLBACK)
    if (
        last_rollback is not None
        and last_rollback.outcome == Outcome.PENDING_REBOOT
        and view.running_slot
        and view.running_slot == last_rollback.result.get("slot")
    ):
        last_rollback.outcome = Outcome.SWITCHED
        last_rollback.outcome_detail = f"the node runs slot {view.running_slot}"
        journal.write(last_rollback)
    if view.running_slot is None:
        log.warning(
            "the running root is not one of the slots; nothing to verify",
            extra={"fields": {"running_root": view.running_root, "disk": view.disk}},
        )
        return None
    if view.trial is not None and view.running_slot == view.trial:
        return start_verify(manager, trial=view.trial, committed=view.default)
    last = journal.last_of(OperationKind.UPGRADE)
    if last is None or last.outcome != Outcome.PENDING_REBOOT:
        return None
    trial = str(last.result.get("trial_slot") or "")
    old = str(last.result.get("from_slot") or "")
    if view.trial_failed == trial and view.running_slot != trial:
        manager.settle_upgrade(
            trial,
            Outcome.FELL_BACK,
            f"slot {trial} did not come up within its tries; GRUB fell back to slot {view.running_slot} "
            "by itself. The upgrade failed: check the image (kernel, initramfs, root filesystem)",
        )
    elif view.trial == trial:
        log.info("the trial boot is armed; waiting for the reboot", extra={"fields": {"slot": trial}})
    elif view.running_slot == trial and view.default == trial:
        manager.settle_upgrade(trial, Outcome.COMMITTED, f"slot {trial} runs and is committed")
    else:
        manager.settle_upgrade(
            trial,
            Outcome.ABANDONED,
            f"the trial of slot {trial} was cleared before it booted; the node runs slot {view.running_slot}"
            + (f" (committed slot {old})" if old else ""),
        )
    return None


def _requested_health(upgrade: Operation | None) -> tuple[HealthConfig | None, str]:
    """The health checks the upgrade request asked for (journaled with it), if any, or why they cannot be used."""
    data = upgrade.request.get("health") if upgrade is not None else None
    if not data:
        return None, ""
    try:
        return HealthConfig.model_validate(data), ""
    except ValidationError as exc:
        # Validated when the request came in; the new slot's agent may be a version that reads them otherwise.
        return None, f"the upgrade's own health checks cannot be read by this agent and are skipped: {exc}"


def start_verify(manager: OperationManager, *, trial: str, committed: str) -> Operation:
    """Health checks on the trial slot that runs, then commit it or roll back to ``committed`` and reboot."""
    last = manager.journal.last_of(OperationKind.UPGRADE)
    upgrade_id = last.id if last is not None and last.result.get("trial_slot") == trial else None
    config = manager.config

    requested, unreadable = _requested_health(last) if upgrade_id else (None, "")

    def verify(op: Operation) -> None:
        manager.set_phase(op, "health-checks")
        checks = config.health.merged(requested)
        if unreadable:
            manager.note(op, "warning", unreadable)
        if checks.empty:
            manager.note(op, "warning", "no health checks are configured; the trial slot counts as healthy")

        def on_result(result: health.CheckResult) -> None:
            manager.note(op, "check", f"{result.name}: {'passed' if result.ok else 'failed'} ({result.detail})")

        results = health.run(checks, list(config.systemctl_command), on_result=on_result)
        failed = [r for r in results if not r.ok]
        manager.set_result(
            op,
            {
                "trial_slot": trial,
                "from_slot": committed,
                "upgrade": upgrade_id,
                "checks": [r.to_dict() for r in results],
                "healthy": not failed,
            },
        )
        if not failed:
            extravars = {**manager.disk_vars("kubeos_mark_good"), "kubeos_mark_good_slot": trial}
            manager.run_playbook(op, OperationKind.MARK_GOOD, extravars, retries=2)
            manager.settle_upgrade(trial, Outcome.COMMITTED, f"health checks passed; slot {trial} is committed")
            return
        reasons = "; ".join(f"{r.name}: {r.detail}" for r in failed)
        extravars = {**manager.disk_vars("kubeos_rollback"), "kubeos_rollback_slot": committed}
        try:
            manager.run_playbook(op, OperationKind.ROLLBACK, extravars, retries=2)
        except OperationFailed as exc:
            # Reboot anyway: the trial still counts its tries down at every boot, so GRUB falls back to
            # slot {committed} by itself at the latest when they are used up. Staying up would keep an
            # unhealthy node running.
            manager.note(op, "warning", f"cannot end the trial ({exc}); rebooting: GRUB falls back after the tries")
            manager.reboot_node(op, f"slot {trial} failed its health checks")
            raise OperationFailed(
                f"health checks failed on slot {trial} ({reasons}) and ending the trial failed ({exc}); "
                f"rebooting: GRUB falls back to slot {committed} when the trial's tries are used up"
            ) from exc
        manager.settle_upgrade(
            trial,
            Outcome.ROLLED_BACK,
            f"health checks failed on slot {trial} ({reasons}); slot {committed} is committed again",
        )
        try:
            manager.reboot_node(op, f"slot {trial} failed its health checks and slot {committed} is committed again")
        except OperationFailed as exc:
            raise OperationFailed(f"health checks failed ({reasons}); {exc}") from exc
        raise OperationFailed(
            f"health checks failed on slot {trial} ({reasons}); rolled back to slot {committed} and rebooting"
        )

    log.info("the node booted a trial slot; verifying it", extra={"fields": {"trial": trial, "committed": committed}})
    return manager.start(
        OperationKind.VERIFY_UPGRADE,
        {"operation": OperationKind.VERIFY_UPGRADE.value, "trial_slot": trial, "from_slot": committed},
        verify,
        cancellable=False,
    )
