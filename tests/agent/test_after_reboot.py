"""After the reboot, with the real daemon process: a reboot is simulated by stopping the agent and starting it
again with the running root set to the slot the node would now run (what the kernel command line says)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support.tls import serve

from .helpers import DaemonProcess, Node, run_op, wait_op, wait_until

pytestmark = pytest.mark.loop


@pytest.fixture
def daemons() -> Iterator[Callable[[Node], DaemonProcess]]:
    started: list[DaemonProcess] = []

    def start(node: Node) -> DaemonProcess:
        daemon = DaemonProcess(node).start()
        started.append(daemon)
        return daemon

    try:
        yield start
    finally:
        for daemon in started:
            daemon.stop()


def upgrade_and_reboot(node: Node, start: Callable[[Node], DaemonProcess], **fields: Any) -> dict[str, Any]:
    """Arm the trial of the prepared slot B through the daemon, which then runs the reboot command."""
    daemon = start(node)
    op = run_op(node, "upgrade", **fields)
    assert op["state"] == "succeeded", op
    assert node.reboots() == ["reboot "]
    assert daemon.stop() == 0
    return op


def wait_settled(node: Node, upgrade_id: str) -> dict[str, Any]:
    def settled() -> dict[str, Any] | None:
        op = node.client().get(upgrade_id).operation
        return op if op["outcome"] != "pending-reboot" else None

    return wait_until(settled, timeout=60, what="the upgrade to settle")  # type: ignore[no-any-return]


def verify_op(node: Node) -> dict[str, Any]:
    ops = node.client().operations().body["operations"]
    verify = [op for op in ops if op["kind"] == "verify_upgrade"]
    assert len(verify) == 1, ops
    return wait_op(node, verify[0]["id"])


def fake_systemctl(path: Path) -> list[str]:
    """``systemctl is-active UNIT``: active for kubelet.service only."""
    path.write_text('#!/bin/sh\n[ "$1" = is-active ] && [ "$2" = kubelet.service ]\n')
    path.chmod(0o755)
    return [str(path)]


def test_trial_boot_with_passing_health_checks_is_committed(
    make_node: Callable[..., Node], daemons: Callable[[Node], DaemonProcess]
) -> None:
    node = make_node("prepared")
    upgrade = upgrade_and_reboot(node, daemons)
    healthz = node.root / "healthz"
    healthz.mkdir()
    (healthz / "healthz").write_text("ok")
    with serve(healthz) as server:
        node.running("B")
        node.configure(
            systemctl_command=fake_systemctl(node.root / "systemctl"),
            health={
                "deadline": 20,
                "interval": 0.2,
                "units": ["kubelet.service"],
                "commands": [{"argv": ["test", "-d", "/"], "name": "root is there"}],
                "http": [{"url": f"{server.url}/healthz"}],
            },
        )
        daemons(node)
        settled = wait_settled(node, upgrade["id"])
        verify = verify_op(node)
        status = node.client().status().body

    assert settled["outcome"] == "committed", settled
    assert verify["state"] == "succeeded", verify
    assert verify["result"]["healthy"] is True
    assert [c["name"] for c in verify["result"]["checks"]] == [
        "unit kubelet.service",
        "root is there",
        f"http {server.url}/healthz",
    ]
    env = node.grubenv()
    assert env["kubeos_default"] == "B" and "kubeos_trial" not in env
    assert node.reboots() == ["reboot "]  # no second reboot
    assert status["last_upgrade"]["outcome"] == "committed"
    assert status["disk"]["running_slot"] == "B" and status["disk"]["grub"]["default"] == "B"


def test_trial_boot_with_failing_health_checks_rolls_back_and_reboots(
    make_node: Callable[..., Node], daemons: Callable[[Node], DaemonProcess]
) -> None:
    node = make_node("prepared")
    upgrade = upgrade_and_reboot(node, daemons)
    node.running("B")
    node.configure(
        systemctl_command=fake_systemctl(node.root / "systemctl"),
        health={
            "deadline": 20,
            "interval": 0.2,
            "units": ["kubelet.service"],
            "commands": [{"argv": ["sh", "-c", "echo kubelet not ready >&2; exit 3"], "deadline": 1}],
        },
    )
    daemons(node)
    settled = wait_settled(node, upgrade["id"])
    verify = verify_op(node)
    status = node.client().status().body

    assert settled["outcome"] == "rolled-back", settled
    assert "kubelet not ready" in settled["outcome_detail"]
    assert verify["state"] == "failed"
    assert "health checks failed on slot B" in verify["error"] and "rolled back to slot A" in verify["error"]
    checks = {c["name"]: c for c in verify["result"]["checks"]}
    assert checks["unit kubelet.service"]["ok"] is True
    failing = checks["command sh -c echo kubelet not ready >&2; exit 3"]
    assert failing["ok"] is False and failing["attempts"] >= 2 and "exit 3" in failing["detail"]
    env = node.grubenv()
    assert env["kubeos_default"] == "A" and "kubeos_trial" not in env
    assert env["kubeos_B_bootable"] == "yes"  # the image itself is intact; the node just goes back
    assert node.reboots() == ["reboot ", "reboot "]
    assert status["last_upgrade"]["outcome"] == "rolled-back"


def test_grub_fallback_is_reported_as_a_failed_upgrade(
    make_node: Callable[..., Node], daemons: Callable[[Node], DaemonProcess]
) -> None:
    node = make_node("prepared")
    upgrade = upgrade_and_reboot(node, daemons)
    # What GRUB leaves after the trial slot used up its tries: trial cleared, failure recorded, slot A booted.
    node.set_grubenv(kubeos_trial=None, kubeos_tries=None, kubeos_trial_failed="B")
    node.running("A")
    daemons(node)
    settled = wait_settled(node, upgrade["id"])
    status = node.client().status().body
    ops = node.client().operations().body["operations"]

    assert settled["outcome"] == "fell-back"
    assert "GRUB fell back to slot A" in settled["outcome_detail"]
    assert status["last_upgrade"]["outcome"] == "fell-back"
    assert status["disk"]["grub"]["trial_failed"] == "B"
    assert not [op for op in ops if op["kind"] == "verify_upgrade"]
    assert node.grubenv()["kubeos_default"] == "A"
    assert node.reboots() == ["reboot "]


def test_a_restart_before_the_reboot_leaves_the_armed_trial_alone(
    make_node: Callable[..., Node], daemons: Callable[[Node], DaemonProcess]
) -> None:
    node = make_node("prepared")
    upgrade = upgrade_and_reboot(node, daemons)
    daemons(node)  # still running slot A: the reboot has not happened yet
    op = node.client().get(upgrade["id"]).operation
    assert op["outcome"] == "pending-reboot"
    assert node.grubenv()["kubeos_trial"] == "B"


def test_an_upgrade_cut_short_by_its_own_reboot_is_recorded_as_succeeded(
    make_node: Callable[..., Node], daemons: Callable[[Node], DaemonProcess]
) -> None:
    """A fast reboot can take the agent down before it writes the operation's end: the journal then shows the
    upgrade in phase ``rebooting``. That is the reboot the upgrade asked for, not an interruption."""
    node = make_node("prepared")
    killer = node.root / "reboot-now.sh"
    killer.write_text(f'#!/bin/sh\necho "reboot $*" >> {node.reboot_log}\nkill -KILL $PPID\nsleep 5\n')
    killer.chmod(0o755)
    node.configure(reboot_command=[str(killer)])
    daemon = daemons(node)
    upgrade_id = node.client().start("upgrade").operation["id"]
    assert daemon.proc is not None
    daemon.proc.wait(timeout=60)
    assert node.reboots() == ["reboot "]

    node.running("B")
    node.configure(health={"deadline": 5, "interval": 0.2})
    daemons(node)
    settled = wait_settled(node, upgrade_id)
    assert settled["state"] == "succeeded" and settled["error"] is None, settled
    assert settled["outcome"] == "committed", settled
    assert any(e["message"] == "the node restarted as the operation asked" for e in settled["events"]), settled
    assert node.grubenv()["kubeos_default"] == "B"


@pytest.mark.parametrize("healthy", [True, False], ids=["passing", "failing"])
def test_the_upgrade_requests_own_health_checks_decide_with_the_agents(
    make_node: Callable[..., Node], daemons: Callable[[Node], DaemonProcess], healthy: bool
) -> None:
    """The OS object's healthchecks travel in the upgrade request, are journaled with it, and run after the
    reboot beside the agent's configured ones (kubelet here); the request's deadline replaces the agent's."""
    node = make_node("prepared")
    marker = node.root / "workload-ready"
    requested = {
        "deadline": 2,
        "interval": 0.2,
        "commands": [{"argv": ["test", "-e", str(marker)], "name": "workload"}],
    }
    upgrade = upgrade_and_reboot(node, daemons, health=requested)
    assert upgrade["request"]["health"]["commands"][0]["name"] == "workload"
    if healthy:
        marker.write_text("")
    node.running("B")
    node.configure(
        systemctl_command=fake_systemctl(node.root / "systemctl"),
        health={"deadline": 60, "interval": 0.2, "units": ["kubelet.service"]},
    )
    daemons(node)
    settled = wait_settled(node, upgrade["id"])
    verify = verify_op(node)

    checks = {c["name"]: c for c in verify["result"]["checks"]}
    assert set(checks) == {"unit kubelet.service", "workload"}
    assert checks["unit kubelet.service"]["ok"] is True
    assert checks["workload"]["ok"] is healthy
    if healthy:
        assert settled["outcome"] == "committed", settled
        assert node.grubenv()["kubeos_default"] == "B"
    else:
        assert settled["outcome"] == "rolled-back", settled
        assert "workload" in settled["outcome_detail"]
        assert checks["workload"]["seconds"] < 10  # the request's 2 s deadline, not the agent's 60 s
        assert node.grubenv()["kubeos_default"] == "A"
