"""One scheduling round of an OS object, as a pure function of what the API holds.

``plan_round`` takes the OS object, every OS object (for the duplicate-selector check), the Nodes and the
OSInstances as just read, and the time; it returns a :class:`Plan`: which nodes get which operation (their
OSInstance spec and label), which serial labels go on or off, the Events to record and the OS status to
write. Nothing here remembers anything between rounds, so a restarted operator computes the same plan from
the same cluster, and the ``maxunavailable`` limit is counted from what the nodes carry:

- a node is *busy* when it carries ``upgrade.openeuler.org/upgrading`` or ``…/configuring``, **or** its
  OSInstance's ``spec.nodestatus`` is not ``idle`` (the operator writes the OSInstance first and the label
  second, the proxy takes them away in the reverse order, so a node half-assigned or half-released by a
  crash still counts);
- in serial mode, the nodes of the current batch carry ``upgrade.openeuler.org/serial`` and count too.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from . import names
from .models import (
    OS,
    Condition,
    NamespacedName,
    NodeView,
    OSInstance,
    OSInstanceSpec,
    OSStatus,
    find_condition,
    nodestatus_for,
    operation_label_for,
    set_condition,
)
from .timewindow import WindowError
from .timewindow import parse as parse_window

NORMAL = "Normal"
WARNING = "Warning"

# Condition types of OS.status.
PROGRESSING = "Progressing"
COMPLETE = "Complete"
PAUSED = "Paused"
FAILED = "Failed"


@dataclass(frozen=True)
class EventSpec:
    """An Event to record on the OS object (``kind="OS"``) or on a Node (``kind="Node"``)."""

    kind: str
    name: str
    namespace: str
    type: str
    reason: str
    message: str
    # The object's uid: ``kubectl describe`` finds a Node's Events by it.
    uid: str = ""


@dataclass(frozen=True)
class Assignment:
    """Hand ``node`` an operation: write its OSInstance spec, then add ``label``."""

    node: str
    spec: OSInstanceSpec
    label: str
    create_instance: bool
    # Recorded once the assignment is written (not when it is left to the next round).
    events: tuple[EventSpec, ...] = ()


@dataclass(frozen=True)
class LabelChange:
    node: str
    add: Mapping[str, str] = field(default_factory=dict)
    remove: tuple[str, ...] = ()


@dataclass
class Plan:
    assignments: list[Assignment] = field(default_factory=list)
    labels: list[LabelChange] = field(default_factory=list)
    events: list[EventSpec] = field(default_factory=list)
    status: OSStatus = field(default_factory=OSStatus)
    requeue_after: float = 15.0
    # Why nothing new may start this round ("" when new nodes may start).
    blocked: str = ""
    # Nothing is busy and nothing is left that time alone could start (every node is through or failed): until
    # a Node, an OSInstance or the OS object changes, another round would compute the same plan.
    settled: bool = False


def selects(nodeselector: str, node: NodeView) -> bool:
    """KubeOS's ``nodeselector``: ``no-label``, ``all-label`` or the value of the node-selector label."""
    value = node.labels.get(names.LABEL_NODE_SELECTOR)
    if nodeselector == names.SELECT_NO_LABEL:
        return value is None
    if nodeselector == names.SELECT_ALL_LABEL:
        return True
    return value == nodeselector


def duplicates(os: OS, all_os: Iterable[OS]) -> list[str]:
    """Other OS objects with the same nodeselector (an error: none of them is acted on)."""
    return sorted(o.key for o in all_os if o.key != os.key and o.spec.nodeselector == os.spec.nodeselector)


def needs_work(os: OS, node: NodeView, instance: OSInstance | None) -> bool:
    """Upgrade and rollback: the node does not run ``osversion``; config: ``sysconfigs.version`` not applied."""
    spec = os.spec
    if spec.opstype == "config":
        applied = instance.status.sysconfigs.version if instance is not None else ""
        return applied != spec.sysconfigs.version
    return node.os_image != spec.osversion


def is_busy(node: NodeView, instance: OSInstance | None) -> bool:
    return node.operation_label is not None or (instance is not None and instance.busy)


def instance_spec_for(os: OS) -> OSInstanceSpec:
    """What the OSInstance of a node chosen by ``os`` must say: KubeOS's config copying."""
    spec = os.spec
    sysconfigs = spec.sysconfigs
    if spec.opstype in ("upgrade", "rollback"):
        # The sysconfigs of an upgrade run after the slot flip: current and next swap meaning.
        sysconfigs = sysconfigs.with_cmdline_swapped()
    return OSInstanceSpec(
        nodestatus=nodestatus_for(spec.opstype),
        namespacedname=NamespacedName(name=os.name, namespace=os.namespace),
        sysconfigs=sysconfigs,
        upgradeconfigs=spec.upgradeconfigs,
    )


def _isotime(now: datetime.datetime) -> str:
    aware = now if now.tzinfo is not None else now.astimezone()
    return aware.astimezone(datetime.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _what(os: OS) -> str:
    spec = os.spec
    if spec.opstype == "config":
        return f"config {spec.sysconfigs.version}"
    return f"{spec.opstype} to {spec.osversion}"


def plan_round(
    os: OS,
    all_os: Iterable[OS],
    nodes: Iterable[NodeView],
    instances: Mapping[str, OSInstance],
    now: datetime.datetime,
) -> Plan:
    spec = os.spec
    plan = Plan(requeue_after=float(max(1, spec.timeinterval)))
    os_key = os.key
    target = spec.target

    # The nodes this OS acts on.
    selected = [n for n in nodes if selects(spec.nodeselector, n)]
    skipped_cp = [n.name for n in selected if n.control_plane and not spec.allowcontrolplane]
    selected = [n for n in selected if spec.allowcontrolplane or not n.control_plane]
    selected.sort(key=lambda n: (n.control_plane, n.name))

    def inst(node: NodeView) -> OSInstance | None:
        return instances.get(node.name)

    busy = [n for n in selected if is_busy(n, inst(n))]
    busy_names = {n.name for n in busy}
    failed = [
        n
        for n in selected
        if n.name not in busy_names
        and (i := inst(n)) is not None
        and i.failed_on(os_key, spec.opstype, target)
        and needs_work(os, n, i)
    ]
    failed_names = {n.name for n in failed}
    todo = [n for n in selected if needs_work(os, n, inst(n))]
    updated = [n for n in selected if n.name not in busy_names and not needs_work(os, n, inst(n))]

    # What keeps new nodes from starting, most fundamental first.
    problems = spec.problems()
    dup = duplicates(os, all_os)
    window_open = True
    window_text = "always"
    try:
        window = parse_window(spec.timewindow)
        window_open = window.is_open(now)
        window_text = window.describe()
    except WindowError as exc:
        problems.append(str(exc))
    # maxfailures 0 would halt a rollout that has not failed anywhere: it counts as 1.
    budget_spent = spec.maxfailures is not None and len(failed) >= max(1, spec.maxfailures)
    blocked_reason, blocked_message = "", ""
    if problems:
        blocked_reason, blocked_message = "InvalidSpec", "; ".join(problems)
    elif dup:
        blocked_reason = "DuplicateSelector"
        blocked_message = (
            f"nodeselector {spec.nodeselector!r} is also used by {', '.join(dup)}: "
            "give each OS object its own nodeselector (nothing is done until then)"
        )
    elif spec.paused:
        blocked_reason, blocked_message = "Paused", "spec.paused is true: no new node starts; started nodes finish"
    elif budget_spent:
        blocked_reason = "FailureBudgetExhausted"
        blocked_message = (
            f"{len(failed)} node(s) failed ({', '.join(sorted(failed_names))}), maxfailures is {spec.maxfailures}: "
            "no new node starts; fix the nodes or raise maxfailures"
        )
    elif not window_open:
        blocked_reason, blocked_message = "TimeWindowClosed", f"outside the time window ({window_text})"
    plan.blocked = blocked_reason

    limit = max(0, min(spec.maxunavailable, len(selected)))
    candidates = [n for n in todo if n.name not in busy_names and n.name not in failed_names and n.ready]
    # Control-plane nodes (only when allowed): after every other node, and one at a time.
    workers_left = [n for n in candidates if not n.control_plane]
    cp_busy = any(n.control_plane for n in busy)
    candidates = workers_left if workers_left or cp_busy else candidates[:1]
    label = operation_label_for(spec.opstype)
    chosen: list[NodeView] = []

    if not blocked_reason and spec.executionmode == "serial":
        batch = [n for n in selected if names.LABEL_SERIAL in n.labels]
        batch_names = {n.name for n in batch}
        # Serial labels of nodes that are through (done or failed) come off: their place is free again.
        for n in batch:
            if n.name not in busy_names and (n.name in failed_names or not needs_work(os, n, inst(n))):
                plan.labels.append(LabelChange(n.name, remove=(names.LABEL_SERIAL,)))
                batch_names.discard(n.name)
        reserved = batch_names | busy_names
        free = limit - len(reserved)
        for n in [c for c in candidates if c.name not in reserved][: max(0, free)]:
            plan.labels.append(LabelChange(n.name, add={names.LABEL_SERIAL: "true"}))
            plan.events.append(
                EventSpec("OS", os.name, os.namespace, NORMAL, "NodeQueued", f"{n.name} joins the serial batch")
            )
            batch_names.add(n.name)
        if not busy_names:
            waiting = [c for c in candidates if c.name in batch_names]
            chosen = waiting[:1]
    elif not blocked_reason:
        free = limit - len(busy_names)
        chosen = candidates[: max(0, free)]

    for n in chosen:
        in_use = len(busy_names) + len(plan.assignments) + 1
        events = (
            EventSpec(
                "OS",
                os.name,
                os.namespace,
                NORMAL,
                "NodeAssigned",
                f"{n.name}: {_what(os)} ({in_use} of {limit} allowed at once busy)",
            ),
            EventSpec("Node", n.name, "", NORMAL, "OSOperationAssigned", f"{_what(os)} by OS {os_key}", n.uid),
        )
        plan.assignments.append(
            Assignment(n.name, instance_spec_for(os), label, create_instance=inst(n) is None, events=events)
        )

    plan.status = _status(os, plan, selected, busy, failed, updated, todo, skipped_cp, blocked_message, now)
    plan.settled = not busy and not plan.assignments and not plan.labels and all(n.name in failed_names for n in todo)
    return plan


def _status(
    os: OS,
    plan: Plan,
    selected: list[NodeView],
    busy: list[NodeView],
    failed: list[NodeView],
    updated: list[NodeView],
    todo: list[NodeView],
    skipped_cp: list[str],
    blocked_message: str,
    now: datetime.datetime,
) -> OSStatus:
    spec = os.spec
    stamp = _isotime(now)
    gen = os.generation or None
    old = os.status.conditions
    in_progress = len(busy) + len(plan.assignments)
    done = not todo and not busy
    conds: tuple[Condition, ...] = old
    blocked = plan.blocked

    conds = set_condition(
        conds,
        PAUSED,
        spec.paused,
        "PausedBySpec" if spec.paused else "NotPaused",
        "spec.paused is true" if spec.paused else "",
        stamp,
        gen,
    )
    if blocked in ("InvalidSpec", "DuplicateSelector", "FailureBudgetExhausted"):
        conds = set_condition(conds, FAILED, True, blocked, blocked_message, stamp, gen)
    elif failed:
        conds = set_condition(
            conds,
            FAILED,
            True,
            "NodesFailed",
            f"{len(failed)} node(s) failed: {', '.join(n.name for n in failed)}",
            stamp,
            gen,
        )
    else:
        conds = set_condition(conds, FAILED, False, "NoFailures", "", stamp, gen)
    if done:
        message = f"all {len(selected)} selected node(s) at {spec.target}" if selected else "no node is selected"
        if skipped_cp:
            message += f"; control-plane node(s) left out: {', '.join(skipped_cp)} (allowcontrolplane is false)"
        conds = set_condition(conds, COMPLETE, True, "AllNodesUpdated", message, stamp, gen)
        conds = set_condition(conds, PROGRESSING, False, "Complete", message, stamp, gen)
    else:
        # Nodes that still need work and are neither busy, failed, nor being assigned right now.
        not_waiting = {n.name for n in busy} | {n.name for n in failed} | {a.node for a in plan.assignments}
        left = sum(1 for n in todo if n.name not in not_waiting)
        conds = set_condition(
            conds, COMPLETE, False, "NodesLeft", f"{len(updated)} of {len(selected)} node(s) updated", stamp, gen
        )
        if in_progress:
            message = f"{in_progress} node(s) busy, {left} waiting"
            if blocked:
                message += f"; no new node starts: {blocked_message}"
            conds = set_condition(conds, PROGRESSING, True, "NodesInProgress", message, stamp, gen)
        elif blocked:
            conds = set_condition(conds, PROGRESSING, False, blocked, blocked_message, stamp, gen)
        elif left == 0:
            conds = set_condition(conds, PROGRESSING, False, "NothingToStart", "every node left has failed", stamp, gen)
        else:
            conds = set_condition(
                conds, PROGRESSING, False, "WaitingForNodes", f"{left} node(s) to do, none ready", stamp, gen
            )
    _transition_events(os, old, conds, plan)
    return OSStatus(
        conditions=conds,
        matching=len(selected),
        updated=len(updated),
        inProgress=in_progress,
        failed=len(failed),
        observedGeneration=gen,
    )


def _transition_events(os: OS, old: tuple[Condition, ...], new: tuple[Condition, ...], plan: Plan) -> None:
    """One Event per condition whose status or reason changed: decisions are recorded, not repeated."""
    for cond in new:
        before = find_condition(old, cond.type)
        if before is not None and before.status == cond.status and before.reason == cond.reason:
            continue
        if cond.status != "True" and cond.type in (FAILED, PAUSED, COMPLETE) and before is None:
            continue  # a False condition set for the first time says nothing new
        warning = (cond.type == FAILED and cond.status == "True") or cond.reason in ("TimeWindowClosed",)
        plan.events.append(
            EventSpec(
                "OS",
                os.name,
                os.namespace,
                WARNING if warning else NORMAL,
                cond.reason or cond.type,
                f"{cond.type}={cond.status}: {cond.message}" if cond.message else f"{cond.type}={cond.status}",
            )
        )
