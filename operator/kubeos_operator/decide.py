"""The proxy's next step, as a pure function of its OSInstance, the OS object, the agent and the time.

The proxy calls :func:`next_step` after every change and at every poll; whatever it did last (or whether it
was restarted in between) does not matter, only what the API and the agent say now. Phases written into
``OSInstance.status.phase``: pending → preparing → draining → rebooting → verifying → done, or failed.
"""

from __future__ import annotations

import datetime
import enum
from dataclasses import dataclass

from .agentview import AgentView, OperationView
from .models import OS, OSInstance, Phase


class Step(enum.StrEnum):
    IDLE = "idle"  # nothing assigned: tidy up leftovers (labels, our cordon)
    RELEASE = "release"  # the operation ended (done or failed): hand the node back
    OS_GONE = "os-gone"  # the OS object of the operation no longer exists
    BEGIN = "begin"  # a new operation: reset the status to pending
    BACKOFF = "backoff"  # a failed attempt waits before the next
    AGENT_DOWN = "agent-down"  # the agent does not answer (yet): wait
    FOLLOW = "follow"  # an agent operation of ours runs: follow it
    WAIT_REBOOT = "wait-reboot"  # the switch is armed, the agent reboots the node
    WAIT_VERIFY = "wait-verify"  # back up on the new slot: the agent checks it, then commits
    ATTEMPT_FAILED = "attempt-failed"  # this attempt failed: retry or fail for good
    FAIL = "fail"  # failed for good (retrying cannot help)
    FINISH = "finish"  # target reached (committed): sysconfigs, uncordon, done
    CONFIGURE = "configure"  # opstype config: apply sysconfigs
    UPGRADE = "upgrade"  # start an upgrade attempt: upgradeconfigs, prepare, cordon, drain, switch
    ROLLBACK = "rollback"  # start a rollback attempt: drain, switch back


@dataclass(frozen=True)
class Decision:
    step: Step
    reason: str = ""
    wait: float = 0.0


FAILED_OUTCOMES = ("rolled-back", "fell-back", "abandoned")


def _parse(text: str) -> datetime.datetime | None:
    if not text:
        return None
    try:
        return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def next_step(
    inst: OSInstance,
    os: OS | None,
    agent: AgentView | None,
    followed: OperationView | None,
    now: datetime.datetime,
) -> Decision:
    spec, status = inst.spec, inst.status
    if spec.nodestatus == "idle":
        return Decision(Step.IDLE)
    if os is None:
        return Decision(Step.OS_GONE, f"OS {spec.namespacedname.key} no longer exists")
    opstype, target = os.spec.opstype, os.spec.target
    if (status.os, status.opstype, status.target) != (os.key, opstype, target):
        return Decision(Step.BEGIN)
    if status.phase in (Phase.DONE, Phase.FAILED):
        return Decision(Step.RELEASE)
    if agent is None:
        return Decision(Step.AGENT_DOWN, wait=5.0)

    if opstype == "config":
        if status.sysconfigs.version == os.spec.sysconfigs.version and status.sysconfigs.version:
            return Decision(Step.FINISH)
        if followed is not None and followed.kind == "configure" and followed.running:
            return Decision(Step.FOLLOW)
        return _after_backoff(status.nextAttemptAt, now, Decision(Step.CONFIGURE))

    # upgrade / rollback: committed on the target is the only "done".
    if agent.committed(target):
        return Decision(Step.FINISH)
    if agent.current is not None and agent.current.kind == "verify_upgrade":
        return Decision(Step.WAIT_VERIFY, wait=2.0)
    if agent.trial_slot and agent.running_slot == agent.trial_slot:
        return Decision(Step.WAIT_VERIFY, wait=2.0)
    if followed is not None and followed.kind in ("upgrade", "rollback"):
        if followed.running:
            return Decision(Step.FOLLOW)
        if followed.succeeded and followed.outcome == "pending-reboot":
            return Decision(Step.WAIT_REBOOT, wait=5.0)
        if followed.outcome in FAILED_OUTCOMES:
            detail = followed.outcome_detail or followed.error
            return Decision(Step.ATTEMPT_FAILED, f"{followed.outcome}: {detail}".rstrip(": "))
        if followed.outcome in ("committed", "switched"):
            running = agent.running_version or "an unknown version"
            return Decision(
                Step.FAIL,
                f"the node runs {running} on a committed slot after the {followed.kind}, not {target}: "
                "check that the image's PRETTY_NAME is the OS object's osversion",
            )
        if followed.state in ("failed", "canceled", "interrupted"):
            return Decision(
                Step.ATTEMPT_FAILED, f"agent {followed.kind} {followed.state}: {followed.error or followed.phase}"
            )
    if followed is not None and followed.kind == "prepare_upgrade" and followed.running:
        return Decision(Step.FOLLOW)
    if opstype == "rollback":
        other = agent.slots.get(agent.other_slot)
        if other is None or not other.bootable:
            return Decision(
                Step.FAIL,
                f"nothing to roll back to: slot {agent.other_slot or '?'} holds no bootable OS "
                f"(the node runs {agent.running_version or 'an unknown version'})",
            )
        if target not in (other.pretty_name, other.version):
            return Decision(
                Step.FAIL,
                f"slot {agent.other_slot} holds {other.pretty_name or 'an unknown OS'}, not {target}: "
                "a rollback can only go back to the other slot",
            )
        return _after_backoff(status.nextAttemptAt, now, Decision(Step.ROLLBACK))
    return _after_backoff(status.nextAttemptAt, now, Decision(Step.UPGRADE))


def _after_backoff(next_attempt: str, now: datetime.datetime, decision: Decision) -> Decision:
    at = _parse(next_attempt)
    if at is not None and at > now:
        return Decision(Step.BACKOFF, wait=(at - now).total_seconds())
    return decision


def backoff_seconds(attempts: int, base: float, cap: float = 300.0) -> float:
    """Seconds before attempt ``attempts + 1``: base, 2 * base, 4 * base ... at most ``cap``."""
    return float(min(cap, base * 2 ** max(0, attempts - 1)))
