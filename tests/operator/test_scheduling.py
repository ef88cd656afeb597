"""Scheduling rounds as pure functions: which nodes go, and never more than allowed."""

from __future__ import annotations

import datetime
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import pytest

from kubeos_operator import names
from kubeos_operator.models import (
    OS,
    ConfigSet,
    Content,
    NamespacedName,
    NodeView,
    OSInstance,
    OSInstanceSpec,
    OSInstanceStatus,
    OSSpec,
    SysConfig,
    TimeWindow,
)
from kubeos_operator.scheduling import Plan, plan_round

NOON = datetime.datetime(2026, 1, 10, 12, 0, 0)
V1, V2 = "KubeOS v1", "KubeOS v2"


def make_os(name: str = "os", **spec: Any) -> OS:
    base: dict[str, Any] = {"osversion": V2, "maxunavailable": 2, "timeinterval": 5}
    base.update(spec)
    return OS(name=name, namespace="default", spec=replace(OSSpec(), **base), generation=3)


def node(name: str, image: str = V1, *, labels: dict[str, str] | None = None, ready: bool = True) -> NodeView:
    return NodeView(name=name, labels=dict(labels or {}), os_image=image, ready=ready)


def nodes(count: int, image: str = V1, **kw: Any) -> list[NodeView]:
    return [node(f"n{i:02d}", image, **kw) for i in range(count)]


def busy_instance(name: str, os: OS, nodestatus: str = "upgrade") -> OSInstance:
    spec = OSInstanceSpec(nodestatus=nodestatus, namespacedname=NamespacedName(os.name, os.namespace))
    return OSInstance(name=name, namespace="default", spec=spec)


def failed_instance(name: str, os: OS) -> OSInstance:
    status = OSInstanceStatus(phase="failed", os=os.key, opstype=os.spec.opstype, target=os.spec.target)
    return OSInstance(name=name, namespace="default", status=status)


def run(
    os: OS,
    ns: Iterable[NodeView],
    instances: dict[str, OSInstance] | None = None,
    all_os: list[OS] | None = None,
    now: datetime.datetime = NOON,
) -> Plan:
    return plan_round(os, all_os if all_os is not None else [os], list(ns), instances or {}, now)


def assigned(plan: Plan) -> list[str]:
    return [a.node for a in plan.assignments]


def condition(plan: Plan, kind: str) -> tuple[str, str]:
    cond = next(c for c in plan.status.conditions if c.type == kind)
    return cond.status, cond.reason


# --- parallel mode and maxunavailable --------------------------------------------------------------------------


def test_parallel_assigns_up_to_maxunavailable_in_name_order() -> None:
    os = make_os(maxunavailable=3)
    plan = run(os, nodes(10))
    assert assigned(plan) == ["n00", "n01", "n02"]
    first = plan.assignments[0]
    assert first.label == names.LABEL_UPGRADING and first.create_instance
    assert first.spec.nodestatus == "upgrade"
    assert first.spec.namespacedname == NamespacedName("os", "default")
    assert plan.status.inProgress == 3 and plan.status.matching == 10 and plan.status.updated == 0
    assert condition(plan, "Progressing") == ("True", "NodesInProgress")
    assert plan.requeue_after == 5


def test_busy_nodes_from_labels_count_against_the_limit() -> None:
    os = make_os(maxunavailable=3)
    ns = nodes(10)
    ns[4] = replace(ns[4], labels={names.LABEL_UPGRADING: ""})
    ns[7] = replace(ns[7], labels={names.LABEL_UPGRADING: ""})
    assert assigned(run(os, ns)) == ["n00"]


def test_busy_nodes_from_osinstance_count_even_without_label() -> None:
    """A crash between writing the OSInstance and labelling the node must not free a slot."""
    os = make_os(maxunavailable=2)
    instances = {"n05": busy_instance("n05", os)}
    assert assigned(run(os, nodes(10), instances)) == ["n00"]


def test_a_restarted_operator_computes_the_same_limit_from_the_cluster() -> None:
    os = make_os(maxunavailable=3)
    ns = nodes(10)
    first = run(os, ns)
    # What the API holds after the first round was applied: instances written, labels added.
    after = [replace(n, labels={names.LABEL_UPGRADING: ""}) if n.name in assigned(first) else n for n in ns]
    instances = {a.node: OSInstance(a.node, "default", spec=a.spec) for a in first.assignments}
    assert assigned(run(os, after, instances)) == []


def test_limit_is_capped_by_the_number_of_selected_nodes() -> None:
    plan = run(make_os(maxunavailable=50), nodes(4))
    assert len(plan.assignments) == 4


def test_nodes_at_the_target_are_updated_not_assigned() -> None:
    ns = [node("a", V2), node("b", V2), node("c", V1)]
    plan = run(make_os(), ns)
    assert assigned(plan) == ["c"]
    assert plan.status.updated == 2


def test_all_nodes_at_target_is_complete() -> None:
    plan = run(make_os(), nodes(3, V2))
    assert plan.assignments == []
    assert condition(plan, "Complete") == ("True", "AllNodesUpdated")
    assert condition(plan, "Progressing") == ("False", "Complete")
    assert any(e.reason == "AllNodesUpdated" for e in plan.events)


def test_not_ready_nodes_are_not_started() -> None:
    ns = [node("a", ready=False), node("b")]
    assert assigned(run(make_os(), ns)) == ["b"]


def test_zero_maxunavailable_starts_nothing() -> None:
    assert assigned(run(make_os(maxunavailable=0), nodes(3))) == []


# --- node selector ---------------------------------------------------------------------------------------------


def labelled(name: str, value: str | None) -> NodeView:
    return node(name, labels={names.LABEL_NODE_SELECTOR: value} if value is not None else {})


SELECTOR_NODES = [labelled("plain", None), labelled("edge1", "edge"), labelled("core1", "core")]


@pytest.mark.parametrize(
    ("selector", "expected"),
    [("no-label", ["plain"]), ("all-label", ["core1", "edge1", "plain"]), ("edge", ["edge1"]), ("none", [])],
)
def test_nodeselector(selector: str, expected: list[str]) -> None:
    plan = run(make_os(nodeselector=selector, maxunavailable=5), SELECTOR_NODES)
    assert sorted(assigned(plan)) == expected
    assert plan.status.matching == len(expected)


def test_duplicate_nodeselector_is_reported_and_not_acted_on() -> None:
    a, b = make_os("a", nodeselector="edge"), make_os("b", nodeselector="edge")
    plan = run(a, SELECTOR_NODES, all_os=[a, b])
    assert plan.assignments == []
    assert condition(plan, "Failed") == ("True", "DuplicateSelector")
    warning = next(e for e in plan.events if e.reason == "DuplicateSelector")
    assert warning.type == "Warning" and "default/b" in warning.message


def test_different_selectors_do_not_conflict() -> None:
    a, b = make_os("a", nodeselector="edge"), make_os("b", nodeselector="core")
    assert assigned(run(a, SELECTOR_NODES, all_os=[a, b])) == ["edge1"]


def test_a_node_busy_for_another_os_is_not_taken() -> None:
    other = make_os("other", nodeselector="edge")
    mine = make_os("mine", nodeselector="all-label", maxunavailable=5)
    instances = {"edge1": busy_instance("edge1", other)}
    plan = run(mine, SELECTOR_NODES, instances, all_os=[mine, other])
    assert sorted(assigned(plan)) == ["core1", "plain"]


# --- control-plane nodes -----------------------------------------------------------------------------------------


def cp(name: str) -> NodeView:
    return node(name, labels={names.LABEL_CONTROL_PLANE: ""})


def test_control_plane_nodes_are_skipped_by_default() -> None:
    plan = run(make_os(maxunavailable=5), [cp("cp1"), node("w1")])
    assert assigned(plan) == ["w1"]
    assert plan.status.matching == 1


def test_control_plane_nodes_when_allowed_go_after_workers_one_at_a_time() -> None:
    os = make_os(maxunavailable=5, allowcontrolplane=True)
    assert assigned(run(os, [cp("cp1"), cp("cp2"), node("w1")])) == ["w1"]
    assert assigned(run(os, [cp("cp1"), cp("cp2"), node("w1", V2)])) == ["cp1"]
    busy_cp = replace(cp("cp1"), labels={names.LABEL_CONTROL_PLANE: "", names.LABEL_UPGRADING: ""})
    assert assigned(run(os, [busy_cp, cp("cp2"), node("w1", V2)])) == []


# --- serial mode ---------------------------------------------------------------------------------------------------


def test_serial_marks_a_batch_and_starts_one() -> None:
    os = make_os(executionmode="serial", maxunavailable=3)
    plan = run(os, nodes(5))
    marked = [c.node for c in plan.labels if names.LABEL_SERIAL in c.add]
    assert marked == ["n00", "n01", "n02"]
    assert assigned(plan) == ["n00"]


def test_serial_hands_over_only_when_the_running_node_is_done() -> None:
    os = make_os(executionmode="serial", maxunavailable=3)
    serial = {names.LABEL_SERIAL: "true"}
    ns = nodes(5)
    ns[0] = replace(ns[0], labels={**serial, names.LABEL_UPGRADING: ""})
    ns[1] = replace(ns[1], labels=serial)
    ns[2] = replace(ns[2], labels=serial)
    plan = run(os, ns)
    assert assigned(plan) == [] and plan.labels == []
    # n00 finished: its serial label comes off, n03 joins the batch, n01 starts.
    ns[0] = node("n00", V2, labels=serial)
    plan = run(os, ns)
    assert assigned(plan) == ["n01"]
    assert [(c.node, tuple(c.add), c.remove) for c in plan.labels] == [
        ("n00", (), (names.LABEL_SERIAL,)),
        ("n03", (names.LABEL_SERIAL,), ()),
    ]


# --- time window, pause, failure budget -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("start", "end", "now", "open_"),
    [
        ("09:00:00", "17:00:00", datetime.datetime(2026, 1, 1, 12, 0), True),
        ("09:00:00", "17:00:00", datetime.datetime(2026, 1, 1, 18, 0), False),
        ("22:00:00", "04:00:00", datetime.datetime(2026, 1, 1, 23, 30), True),
        ("22:00:00", "04:00:00", datetime.datetime(2026, 1, 2, 3, 59, 59), True),
        ("22:00:00", "04:00:00", datetime.datetime(2026, 1, 2, 12, 0), False),
        ("2026-01-01 00:00:00", "2026-01-02 00:00:00", datetime.datetime(2026, 1, 1, 8, 0), True),
        ("2026-01-01 00:00:00", "2026-01-02 00:00:00", datetime.datetime(2026, 1, 3, 8, 0), False),
        ("", "", datetime.datetime(2026, 1, 3, 8, 0), True),
    ],
)
def test_time_window_gates_new_assignments(start: str, end: str, now: datetime.datetime, open_: bool) -> None:
    plan = run(make_os(timewindow=TimeWindow(start, end)), nodes(2), now=now)
    assert bool(plan.assignments) == open_
    if not open_:
        assert condition(plan, "Progressing") == ("False", "TimeWindowClosed")


def test_closed_window_lets_started_nodes_finish() -> None:
    os = make_os(timewindow=TimeWindow("01:00:00", "02:00:00"))
    ns = nodes(3)
    ns[0] = replace(ns[0], labels={names.LABEL_UPGRADING: ""})
    plan = run(os, ns)
    assert plan.assignments == [] and plan.status.inProgress == 1
    assert condition(plan, "Progressing")[0] == "True"


@pytest.mark.parametrize(("start", "end"), [("10:00:00", ""), ("10:00", "11:00"), ("10:00:00", "2026-01-01 11:00:00")])
def test_unreadable_time_window_is_an_invalid_spec(start: str, end: str) -> None:
    plan = run(make_os(timewindow=TimeWindow(start, end)), nodes(2))
    assert plan.assignments == []
    assert condition(plan, "Failed") == ("True", "InvalidSpec")


def test_paused_starts_nothing_and_says_so() -> None:
    plan = run(make_os(paused=True), nodes(3))
    assert plan.assignments == []
    assert condition(plan, "Paused") == ("True", "PausedBySpec")
    assert condition(plan, "Progressing") == ("False", "Paused")


def test_failed_nodes_are_not_picked_again_and_are_counted() -> None:
    os = make_os(maxunavailable=5)
    plan = run(os, nodes(3), {"n00": failed_instance("n00", os)})
    assert assigned(plan) == ["n01", "n02"]
    assert plan.status.failed == 1
    assert condition(plan, "Failed") == ("True", "NodesFailed")


def test_a_node_failed_on_an_older_target_is_tried_for_a_new_one() -> None:
    old = make_os(osversion="KubeOS v1.5")
    new = make_os(osversion=V2, maxunavailable=5)
    plan = run(new, nodes(2), {"n00": failed_instance("n00", old)})
    assert assigned(plan) == ["n00", "n01"]


def test_failure_budget_halts_new_assignments() -> None:
    os = make_os(maxunavailable=5, maxfailures=2)
    instances = {"n00": failed_instance("n00", os), "n01": failed_instance("n01", os)}
    plan = run(os, nodes(6), instances)
    assert plan.assignments == []
    assert condition(plan, "Failed") == ("True", "FailureBudgetExhausted")
    assert condition(plan, "Progressing") == ("False", "FailureBudgetExhausted")
    # One failure less: still under budget.
    del instances["n01"]
    assert len(run(os, nodes(6), instances).assignments) == 5


# --- config copying ----------------------------------------------------------------------------------------------------

SYSCONFIGS = ConfigSet(
    "s1",
    (
        SysConfig("grub.cmdline.current", contents=(Content("panic", "5"),)),
        SysConfig("grub.cmdline.next", contents=(Content("quiet"),)),
        SysConfig("kernel.sysctl", contents=(Content("vm.swappiness", 10),)),
    ),
)
UPGRADECONFIGS = ConfigSet("u1", (SysConfig("kernel.sysctl", contents=(Content("a.b", 1),)),))


def test_upgrade_copies_configs_with_current_and_next_swapped() -> None:
    os = make_os(sysconfigs=SYSCONFIGS, upgradeconfigs=UPGRADECONFIGS)
    spec = run(os, nodes(1)).assignments[0].spec
    assert [c.model for c in spec.sysconfigs.configs] == ["grub.cmdline.next", "grub.cmdline.current", "kernel.sysctl"]
    assert spec.sysconfigs.version == "s1" and spec.upgradeconfigs == UPGRADECONFIGS


def test_config_operation_copies_configs_unchanged_and_compares_applied_version() -> None:
    os = make_os(opstype="config", sysconfigs=SYSCONFIGS, maxunavailable=5)
    applied = OSInstance("n00", "default", status=OSInstanceStatus(sysconfigs=SYSCONFIGS))
    plan = run(os, nodes(3), {"n00": applied})
    assert assigned(plan) == ["n01", "n02"]
    first = plan.assignments[0]
    assert first.label == names.LABEL_CONFIGURING and first.spec.nodestatus == "config"
    assert first.spec.sysconfigs == SYSCONFIGS
    assert plan.status.updated == 1


def test_rollback_targets_nodes_not_on_osversion() -> None:
    os = make_os(opstype="rollback", osversion=V1, maxunavailable=5)
    plan = run(os, [node("a", V2), node("b", V1)])
    assert assigned(plan) == ["a"]
    assert plan.assignments[0].spec.nodestatus == "upgrade"


# --- events ----------------------------------------------------------------------------------------------------------


def test_every_assignment_is_an_event_on_the_os_and_the_node() -> None:
    plan = run(make_os(maxunavailable=1), nodes(2))
    kinds = {(e.kind, e.name, e.reason) for a in plan.assignments for e in a.events}
    assert ("OS", "os", "NodeAssigned") in kinds
    assert ("Node", "n00", "OSOperationAssigned") in kinds


def test_unchanged_conditions_are_not_repeated_as_events() -> None:
    os = make_os(paused=True)
    first = run(os, nodes(2))
    again = run(replace(os, status=first.status), nodes(2))
    assert any(e.reason == "Paused" for e in first.events)
    assert again.events == []


def test_a_round_on_unchanged_state_computes_the_same_status() -> None:
    """What lets the operator skip the status write when nothing changed."""
    os = make_os(maxunavailable=1)
    ns = nodes(2)
    ns[0] = replace(ns[0], labels={names.LABEL_UPGRADING: ""})
    first = run(os, ns, {"n00": busy_instance("n00", os)})
    again = run(replace(os, status=first.status), ns, {"n00": busy_instance("n00", os)})
    assert again.status == first.status and again.events == []
