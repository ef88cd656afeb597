"""The proxy's next step from its OSInstance, the OS object and the agent: restart-safe by construction."""

from __future__ import annotations

import datetime
from dataclasses import replace
from typing import Any

from kubeos_operator.agentview import AgentView, OperationView, SlotView
from kubeos_operator.decide import Step, backoff_seconds, next_step
from kubeos_operator.models import (
    OS,
    ConfigSet,
    NamespacedName,
    OSInstance,
    OSInstanceSpec,
    OSInstanceStatus,
    OSSpec,
)

NOW = datetime.datetime(2026, 1, 10, 12, 0, tzinfo=datetime.UTC)
V1, V2 = "KubeOS 1.0", "KubeOS 2.0"


def os_obj(**spec: Any) -> OS:
    return OS("os", "default", replace(OSSpec(osversion=V2), **spec))


def inst(os: OS | None = None, *, nodestatus: str = "upgrade", **status: Any) -> OSInstance:
    os = os or os_obj()
    base = {"os": os.key, "opstype": os.spec.opstype, "target": os.spec.target, "phase": "pending"}
    base.update(status)
    return OSInstance(
        "n1",
        "default",
        spec=OSInstanceSpec(nodestatus=nodestatus, namespacedname=NamespacedName("os", "default")),
        status=replace(OSInstanceStatus(), **base),
    )


def agent(running: str = "A", default: str = "A", trial: str = "", b: str = "", **kw: Any) -> AgentView:
    slots = {"A": SlotView(V1, "1.0", True), "B": SlotView(b, b.split()[-1] if b else "", bool(b))}
    return AgentView(running_slot=running, default_slot=default, trial_slot=trial, slots=slots, **kw)


def op(kind: str, state: str = "succeeded", outcome: str = "", **kw: Any) -> OperationView:
    return OperationView(id="op-1", kind=kind, state=state, outcome=outcome, **kw)


def test_idle_instance_only_tidies() -> None:
    assert next_step(inst(nodestatus="idle"), os_obj(), agent(), None, NOW).step == Step.IDLE


def test_a_new_operation_resets_the_status_first() -> None:
    old = inst(target="KubeOS 1.5", phase="failed")
    assert next_step(old, os_obj(), agent(), None, NOW).step == Step.BEGIN


def test_fresh_upgrade_starts_an_attempt() -> None:
    assert next_step(inst(), os_obj(), agent(), None, NOW).step == Step.UPGRADE


def test_agent_unreachable_waits() -> None:
    decision = next_step(inst(), os_obj(), None, None, NOW)
    assert decision.step == Step.AGENT_DOWN and decision.wait > 0


def test_armed_upgrade_waits_for_the_reboot() -> None:
    d = next_step(
        inst(agentOperation="op-1"), os_obj(), agent(trial="B", b=V2), op("upgrade", outcome="pending-reboot"), NOW
    )
    assert d.step == Step.WAIT_REBOOT


def test_trial_slot_running_waits_for_the_agents_commit() -> None:
    view = agent(running="B", default="A", trial="B", b=V2)
    assert next_step(inst(agentOperation="op-1"), os_obj(), view, None, NOW).step == Step.WAIT_VERIFY


def test_done_only_when_the_target_is_committed_on_the_booted_slot() -> None:
    committed = agent(running="B", default="B", b=V2)
    assert (
        next_step(inst(agentOperation="op-1"), os_obj(), committed, op("upgrade", outcome="committed"), NOW).step
        == Step.FINISH
    )
    # A matching PRETTY_NAME on an uncommitted slot is not done.
    assert not agent(running="B", default="A", trial="B", b=V2).committed(V2)


def test_rolled_back_upgrade_is_a_failed_attempt_with_the_reason() -> None:
    followed = op("upgrade", outcome="rolled-back", outcome_detail="kubelet.service inactive")
    d = next_step(inst(agentOperation="op-1"), os_obj(), agent(b=V2), followed, NOW)
    assert d.step == Step.ATTEMPT_FAILED and "rolled-back" in d.reason and "kubelet" in d.reason


def test_committed_on_the_wrong_version_fails_for_good() -> None:
    view = agent(running="B", default="B", b="KubeOS 2.1")
    d = next_step(inst(agentOperation="op-1"), os_obj(), view, op("upgrade", outcome="committed"), NOW)
    assert d.step == Step.FAIL and "KubeOS 2.1" in d.reason


def test_backoff_after_a_failed_attempt() -> None:
    later = (NOW + datetime.timedelta(seconds=30)).isoformat()
    d = next_step(inst(attempts=1, nextAttemptAt=later), os_obj(), agent(), None, NOW)
    assert d.step == Step.BACKOFF and 29 <= d.wait <= 30
    earlier = (NOW - datetime.timedelta(seconds=1)).isoformat()
    assert next_step(inst(attempts=1, nextAttemptAt=earlier), os_obj(), agent(), None, NOW).step == Step.UPGRADE


def test_backoff_doubles_up_to_a_cap() -> None:
    assert [backoff_seconds(n, 10) for n in (1, 2, 3, 4, 10)] == [10, 20, 40, 80, 300]


def test_finished_operation_releases_the_node() -> None:
    assert next_step(inst(phase="done"), os_obj(), agent(), None, NOW).step == Step.RELEASE
    assert next_step(inst(phase="failed"), os_obj(), agent(), None, NOW).step == Step.RELEASE


def test_os_object_gone_fails_the_operation() -> None:
    assert next_step(inst(), None, agent(), None, NOW).step == Step.OS_GONE


def test_rollback_needs_the_target_on_the_other_bootable_slot() -> None:
    rollback = os_obj(opstype="rollback", osversion=V1)
    on_v2 = agent(running="B", default="B", b=V2)
    assert next_step(inst(rollback), rollback, on_v2, None, NOW).step == Step.ROLLBACK
    fresh = agent(running="A", default="A", b="")  # slot B was never written: KubeOS would point GRUB at it
    fresh_rollback = os_obj(opstype="rollback", osversion="KubeOS 0.9")
    d = next_step(inst(fresh_rollback), fresh_rollback, fresh, None, NOW)
    assert d.step == Step.FAIL and "no bootable OS" in d.reason


def test_config_operation_configures_then_finishes() -> None:
    conf = os_obj(opstype="config", sysconfigs=ConfigSet("c1"))
    assert next_step(inst(conf, nodestatus="config"), conf, agent(), None, NOW).step == Step.CONFIGURE
    applied = inst(conf, nodestatus="config", sysconfigs=ConfigSet("c1"))
    assert next_step(applied, conf, agent(), None, NOW).step == Step.FINISH


def test_agent_status_document_is_read() -> None:
    view = AgentView.from_dict(
        {
            "disk": {
                "running_slot": "B",
                "slots": {
                    "A": {"pretty_name": V1, "version": "1.0", "bootable": True},
                    "B": {"pretty_name": V2, "version": "2.0", "bootable": True},
                },
                "grub": {"default": "B", "trial": None, "tries": 0},
            },
            "current_operation": None,
            "last_upgrade": {"id": "op-x", "kind": "upgrade", "state": "succeeded", "outcome": "committed"},
        }
    )
    assert view.committed(V2) and view.committed("2.0") and not view.committed(V1)
    assert view.other_slot == "A" and view.running_version == V2
    assert view.last_upgrade is not None and view.last_upgrade.outcome == "committed"
