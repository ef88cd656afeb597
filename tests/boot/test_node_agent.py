"""The whole node story in a VM: the real os-agent on a Debian node upgrades itself, and rolls itself back.

The node OS (tools/vmtest/nodeos/build.py: debootstrap'ed Debian bookworm with systemd, python3, the agent
in /opt/kubeos/venv, the kubeos.os collection, the agent's systemd unit; cached) is provisioned as v1 in
slot A of a fresh disk laid out by the collection. QEMU (OVMF, -accel tcg, no network) boots it with the v2
payload as a second, read-only virtio disk (/dev/vdb); when the node resets, QEMU is started again on the
same disk (``NodeQemu.boot_node``: a power cycle, see vm.py for why). Inside, kubeos-test-driver.service runs
``kubeosctl upgrade --image file:///dev/vdb …``; from there on the node is on its own: the agent writes
slot B, arms the trial and reboots; GRUB boots B; the agent runs its health check
(``systemctl is-active kubeos-health.service``) and commits B, or, when the health unit fails on v2, ends
the trial and reboots, and the node comes back on A v1.

Every slot, version and decision asserted here is what the node printed on its serial console
(``KUBEOS-NODE`` lines of the driver, ``kubeos:`` lines of GRUB); the GRUB environment is read on the host
afterwards with the real grub-editenv. See docs/node-vm-test.md.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from vmtest.disk import mounted_partition
from vmtest.nodeos import build as nodeos_build
from vmtest.nodeos.vm import (
    NodeBoot,
    NodeEvent,
    NodeQemu,
    boot_summary,
    detach_loops,
    node_boots,
    node_journal,
    provision_disk,
    queue_commands,
)
from vmtest.qemu import Run

from .conftest import _require_boot_tools, console_tail

pytestmark = [pytest.mark.loop, pytest.mark.slow, pytest.mark.timeout(1800)]

MIB = 1024 * 1024
# Hard limit of one scenario: all its boots (each reset starts a fresh QEMU) and the agent's work, under TCG.
RUN_TIMEOUT = 900
PANIC_TIMEOUT = 5


@pytest.fixture(scope="session")
def nodeos() -> dict[str, Any]:
    """The node OS payloads v1 and v2, built (a few minutes cold) or found up to date in the cache."""
    _require_boot_tools()
    if not shutil.which("debootstrap"):
        pytest.skip("debootstrap is not installed (scripts/setup.sh installs it)")
    lines: list[str] = []
    try:
        manifest = nodeos_build.ensure(log=lines.append)
    except nodeos_build.BuildError as exc:
        pytest.fail(f"building the node OS failed: {exc}\n" + "\n".join(lines))
    print("\n".join(f"nodeos: {line}" for line in lines))
    return manifest


def _payload(nodeos: dict[str, Any], version: str) -> tuple[Path, str]:
    return Path(nodeos["paths"][f"node-{version}.ext4"]), str(nodeos["versions"][version]["sha256"])


@dataclass
class Story:
    """One scenario: a fresh node disk and one QEMU run of it, in a background thread."""

    name: str
    disk: Path
    qemu: NodeQemu
    thread: threading.Thread | None = None
    run: Run | None = None
    error: BaseException | None = None

    def start(self) -> None:
        def boot() -> None:
            try:
                self.run = self.qemu.boot_node(self.disk, timeout=RUN_TIMEOUT)
            except BaseException as exc:  # reported by wait()
                self.error = exc

        # The thread lives as long as QEMU does (QEMU dies with the thread that started it: PDEATHSIG).
        self.thread = threading.Thread(target=boot, name=f"qemu-{self.name}", daemon=True)
        self.thread.start()

    def wait(self) -> Run:
        assert self.thread is not None
        self.thread.join(RUN_TIMEOUT + 60)
        if self.error is not None:
            raise self.error
        assert self.run is not None, f"the {self.name} run did not end"
        return self.run


# Scenario -> (the test that asserts it, versions whose health check fails).
SCENARIOS = {
    "commit": ("test_kubeosctl_upgrade_in_the_node_health_checks_pass_and_the_agent_commits", []),
    "rollback": ("test_a_failing_health_check_brings_the_node_back_on_the_old_slot_by_itself", ["v2"]),
}


@pytest.fixture(scope="module")
def stories(
    request: pytest.FixtureRequest, nodeos: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Story]]:
    """Both scenarios start at once, each in its own QEMU (one vCPU each, so two host cores serve them side by
    side); each test then waits for its own run. Only the scenarios of selected tests are started."""
    selected = {getattr(item, "originalname", item.name) for item in request.session.items}
    payload_mib = max(entry["size"] for entry in nodeos["versions"].values()) // MIB
    root_mib = -(-(payload_mib + 32) // 64) * 64
    v1_image, v1_sha = _payload(nodeos, "v1")
    v2_image, v2_sha = _payload(nodeos, "v2")
    started: dict[str, Story] = {}
    try:
        for name, (test, unhealthy) in SCENARIOS.items():
            if test not in selected:
                continue
            work = tmp_path_factory.mktemp(f"node-{name}")
            disk = work / "node.img"
            provision_disk(
                disk,
                v1_image,
                v1_sha,
                size_mib=64 + 64 + 2 * root_mib + 256 + 2,
                root_size=f"{root_mib}MiB",
                kernel_args="console=ttyS0",
                panic_timeout=PANIC_TIMEOUT,
                workdir=work,
            )
            queue_commands(
                disk, [f"upgrade file:///dev/vdb {v2_sha}", "status", "poweroff"], unhealthy_versions=unhealthy
            )
            machine = NodeQemu(work / "qemu")
            machine.extra_disks = [v2_image]
            story = Story(name, disk, machine)
            started[name] = story
            story.start()
        yield started
    finally:
        for story in started.values():
            story.qemu.close()
            while story.thread is not None and story.thread.is_alive():
                story.thread.join(5)
                story.qemu.close()  # a QEMU that boot_node was just starting
            detach_loops(story.disk)


def _grubenv(image: Path) -> dict[str, str]:
    """The GRUB environment as the real grub-editenv lists it."""
    with mounted_partition(image, "BOOT") as boot:
        out = subprocess.run(
            ["grub-editenv", str(boot / "grub/grubenv"), "list"], capture_output=True, text=True, check=True
        ).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


Context = Callable[[], str]


def _context(run: Run, boots: list[NodeBoot], disk: Path) -> Context:
    """What to show when an assertion fails (only then: it reads the node's journal from PERSIST)."""

    def describe() -> str:
        rows = "\n".join(f"  boot {i}: {row}" for i, row in enumerate(boot_summary(boots, run.seconds), 1))
        events = "\n".join(f"  {ev.text[:400]}" for boot in boots for ev in boot.events)
        agent_log = node_journal(disk, ("kubeos-agent.service", "kubeos-test-driver.service"), lines=80)
        return (
            f"{run.summary()}\n{rows}\ndriver lines:\n{events}\n"
            f"console tail ({run.log}):\n{console_tail(run.console, 60)}\n"
            f"journal of the node's agent and driver:\n{agent_log}"
        )

    return describe


def _booted(boots: list[NodeBoot]) -> list[tuple[str, str, str]]:
    out = []
    for boot in boots:
        ev = boot.booted
        out.append(("?", "?", "no driver line") if ev is None else (ev.get("slot"), ev.get("version"), ev.get("check")))
    return out


def _need(boot: NodeBoot, kind: str, context: Context) -> NodeEvent:
    event = boot.last(kind)
    assert event is not None, f"no KUBEOS-NODE {kind} line in this boot\n{context()}"
    return event


def _report(name: str, run: Run, boots: list[NodeBoot]) -> None:
    print(f"\n{name}: {run.summary()}")
    for index, row in enumerate(boot_summary(boots, run.seconds), 1):
        print(f"  boot {index}: {row}")


def _assert_upgrade_from_a(boot: NodeBoot, v2_sha: str, context: Context) -> None:
    """Boot 1: A v1 settles committed and idle, then kubeosctl upgrade writes B and arms its trial."""
    settled = _need(boot, "settled", context)
    assert (settled.get("running"), settled.get("committed"), settled.get("trial")) == ("A", "A", None), context()
    upgrade = _need(boot, "upgrade", context)
    assert upgrade.get("rc") == 0, context()
    prepare, arm = upgrade.get("prepare") or {}, upgrade.get("arm") or {}
    assert prepare.get("state") == "succeeded" and prepare.get("slot") == "B", context()
    assert prepare.get("sha256") == v2_sha, context()
    assert arm.get("state") == "succeeded", context()
    assert (arm.get("trial_slot"), arm.get("from_slot"), arm.get("outcome")) == ("B", "A", "pending-reboot"), context()
    # The agent rebooted the node by itself: systemd stopped the driver while it waited.
    assert boot.last("stopping") is not None, context()


def test_kubeosctl_upgrade_in_the_node_health_checks_pass_and_the_agent_commits(
    stories: dict[str, Story], nodeos: dict[str, Any]
) -> None:
    _, v2_sha = _payload(nodeos, "v2")
    story = stories["commit"]
    run = story.wait()
    node_disk = story.disk
    boots = node_boots(run)
    context = _context(run, boots, node_disk)
    _report("commit", run, boots)

    assert _booted(boots) == [("A", "v1", "ok"), ("B", "v2", "ok")], context()
    first, second = boots
    _assert_upgrade_from_a(first, v2_sha, context)

    # Boot 2: GRUB boots B on trial; the health unit passes; the agent commits B by itself.
    assert any("trial boot of slot B" in line for line in second.grub), context()
    health = _need(second, "health", context)
    assert health.get("healthy") is True and health.get("version") == "v2", context()
    settled = _need(second, "settled", context)
    assert (settled.get("running"), settled.get("committed"), settled.get("trial")) == ("B", "B", None), context()
    upgrade = settled.get("upgrade") or {}
    assert upgrade.get("outcome") == "committed", context()
    assert (settled.get("last_operation") or {}).get("kind") == "verify_upgrade", context()
    assert (settled.get("last_operation") or {}).get("state") == "succeeded", context()
    assert settled.get("slots") == {
        "A": {"version": "v1", "bootable": True},
        "B": {"version": "v2", "bootable": True},
    }, context()
    status = _need(second, "ctl-status", context)  # kubeosctl --json status says the same
    assert (status.get("rc"), status.get("committed"), status.get("trial")) == (0, "B", None), context()
    assert (status.get("upgrade") or {}).get("outcome") == "committed", context()
    assert _need(second, "action", context).get("action") == "poweroff", context()
    assert run.powered_off, context()

    env = _grubenv(node_disk)
    assert env.get("kubeos_default") == "B", env
    assert env.get("kubeos_trial", "") == "" and env.get("kubeos_tries", "") == "", env
    assert env.get("kubeos_trial_failed", "") == "", env
    assert env.get("kubeos_B_image") == v2_sha, env


def test_a_failing_health_check_brings_the_node_back_on_the_old_slot_by_itself(
    stories: dict[str, Story], nodeos: dict[str, Any]
) -> None:
    _, v2_sha = _payload(nodeos, "v2")
    story = stories["rollback"]
    run = story.wait()
    node_disk = story.disk
    boots = node_boots(run)
    context = _context(run, boots, node_disk)
    _report("rollback", run, boots)

    assert _booted(boots) == [("A", "v1", "ok"), ("B", "v2", "ok"), ("A", "v1", "ok")], context()
    first, second, third = boots
    _assert_upgrade_from_a(first, v2_sha, context)

    # Boot 2: B on trial, its health unit fails; the agent ends the trial and reboots without any command.
    assert any("trial boot of slot B" in line for line in second.grub), context()
    health = _need(second, "health", context)
    assert health.get("healthy") is False and health.get("version") == "v2", context()
    assert second.first("settled") is None, context  # the driver never saw B settle: the agent rebooted it
    assert second.first("command") is None, context  # and no queued command ran on B
    verifying = [ev for ev in second.of_kind("status") if (ev.get("operation") or {}).get("kind") == "verify_upgrade"]
    assert verifying, context()
    assert second.last("stopping") is not None, context()

    # Boot 3: GRUB boots A normally (the agent cleared the trial; GRUB did not have to use up the tries).
    assert not any("trial" in line for line in third.grub), context()
    settled = _need(third, "settled", context)
    assert (settled.get("running"), settled.get("committed"), settled.get("trial")) == ("A", "A", None), context()
    upgrade = settled.get("upgrade") or {}
    assert upgrade.get("outcome") == "rolled-back", context()
    assert "health checks failed" in str(upgrade.get("outcome_detail")), context()
    assert "kubeos-health.service" in str(upgrade.get("outcome_detail")), context()
    status = _need(third, "ctl-status", context)
    assert (status.get("rc"), status.get("committed"), status.get("running")) == (0, "A", "A"), context()
    assert (status.get("upgrade") or {}).get("outcome") == "rolled-back", context()
    assert _need(third, "action", context).get("action") == "poweroff", context()
    assert run.powered_off, context()

    env = _grubenv(node_disk)
    assert env.get("kubeos_default") == "A", env
    assert env.get("kubeos_trial", "") == "" and env.get("kubeos_tries", "") == "", env
    assert env.get("kubeos_trial_failed", "") == "", env  # the agent rolled back, not GRUB
