"""What the collection promises, proven on real boots (QEMU, OVMF, GRUB, the Debian kernel).

Every slot and version asserted here comes from what the booted OS printed on the serial console,
never from what the test wrote. The disk is changed only while the VM is off, through the
collection's modules (the image loop-attached by the modules themselves).
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from support.killedwrite import kill_slot_write_midway

from vmtest.disk import mounted_partition, queue_actions
from vmtest.qemu import Qemu, Run

from .conftest import TestOS, console_tail

pytestmark = [pytest.mark.loop, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
MIB = 1024 * 1024
BOOT_TIMEOUT = 240
MARKER = "persist-marker"


def _context(run: Run) -> str:
    return f"{run.summary()}\nconsole ({run.log}):\n{console_tail(run.console, 80)}"


def _booted(run: Run) -> list[tuple[str, str]]:
    return [(b.slot, b.version) for b in run.boots]


def _cat(run: Run, name: str) -> list[str]:
    """Contents the OS printed for ``cat NAME`` actions, in order ("<missing>" when absent)."""
    out = []
    for ev in run.console.of_kind("cat"):
        if ev.fields.get("name") == name:
            out.append("<missing>" if ev.fields.get("missing") == "yes" else ev.fields.get("content", ""))
    return out


def _grubenv(image: Path) -> dict[str, str]:
    """The GRUB environment as the real grub-editenv lists it."""
    with mounted_partition(image, "BOOT") as boot:
        out = subprocess.run(
            ["grub-editenv", str(boot / "grub/grubenv"), "list"], capture_output=True, text=True, check=True
        ).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


@pytest.fixture
def node(image_file: Callable[..., Path], run_module: Callable[..., Any], testos: TestOS) -> Path:
    """A disk laid out by the collection with v1 in slot A, committed: a freshly provisioned node."""
    disk = image_file("node.img", size_mib=1024)
    steps = [
        (
            "kubeos.os.disk_layout",
            {"device": str(disk), "root_size": "256MiB", "kernel_args": "console=ttyS0", "panic_timeout": 1},
        ),
        ("kubeos.os.slot_write", {"device": str(disk), "slot": "A", **testos.slot_write_args("v1")}),
        ("kubeos.os.boot_slot", {"device": str(disk), "state": "committed", "slot": "A"}),
    ]
    for name, args in steps:
        res = run_module(name, args)
        assert not res.failed, f"{name}: {res.msg}"
    return disk


def test_upgrade_trial_commit_rollback_and_fallback_from_a_broken_image(
    node: Path, run_module: Callable[..., Any], testos: TestOS, qemu: Qemu
) -> None:
    disk = str(node)

    # 1. A freshly built image boots slot A, version v1; v1 leaves a file on PERSIST.
    queue_actions(node, [f"write {MARKER} written-by-v1", "poweroff"])
    run = qemu.boot(node, timeout=BOOT_TIMEOUT)
    assert _booted(run) == [("A", "v1")], _context(run)
    assert run.powered_off, _context(run)

    # 2. v2 into B (the inactive slot), trial with 3 tries: B v2 boots and sees v1's file.
    write = run_module("kubeos.os.slot_write", {"device": disk, **testos.slot_write_args("v2")})
    assert not write.failed and write.result["slot"] == "B", write.msg
    trial = run_module("kubeos.os.boot_slot", {"device": disk, "state": "trial", "tries": 3})
    assert not trial.failed and trial.result["slot"] == "B", trial.msg
    queue_actions(node, [f"cat {MARKER}", "poweroff"])
    run = qemu.boot(node, timeout=BOOT_TIMEOUT)
    assert _booted(run) == [("B", "v2")], _context(run)
    assert any("trial boot of slot B" in line for line in run.console.grub), _context(run)
    assert _cat(run, MARKER) == ["written-by-v1"], _context(run)
    env = _grubenv(node)
    assert (env.get("kubeos_default"), env.get("kubeos_trial"), env.get("kubeos_tries")) == ("A", "B", "2"), env

    # ... committed: the next boot is still B v2, and no trial is left.
    commit = run_module("kubeos.os.boot_slot", {"device": disk, "state": "committed"})
    assert not commit.failed and commit.result["slot"] == "B", commit.msg
    run = qemu.boot(node, timeout=BOOT_TIMEOUT)
    assert _booted(run) == [("B", "v2")], _context(run)
    assert not any("trial" in line for line in run.console.grub), _context(run)

    # 5. Manual rollback from B to A: v1 boots again.
    back = run_module("kubeos.os.boot_slot", {"device": disk, "state": "rollback"})
    assert not back.failed and back.result["slot"] == "A", back.msg
    run = qemu.boot(node, timeout=BOOT_TIMEOUT)
    assert _booted(run) == [("A", "v1")], _context(run)

    # Back to B v2 as the committed slot for the fallback story.
    forward = run_module("kubeos.os.boot_slot", {"device": disk, "state": "rollback", "slot": "B"})
    assert not forward.failed, forward.msg

    # 3. Broken v3 into A, trial with 3 tries: every try shows on the console, v3 panics each time,
    #    the tries run out and GRUB falls back to B v2 by itself.
    write = run_module("kubeos.os.slot_write", {"device": disk, "slot": "A", **testos.slot_write_args("v3")})
    assert not write.failed, write.msg
    trial = run_module("kubeos.os.boot_slot", {"device": disk, "state": "trial", "slot": "A", "tries": 3})
    assert not trial.failed, trial.msg
    queue_actions(node, [f"cat {MARKER}", "poweroff"])
    run = qemu.boot(node, timeout=3 * BOOT_TIMEOUT)
    context = _context(run)
    assert _booted(run) == [("A", "v3"), ("A", "v3"), ("A", "v3"), ("B", "v2")], context
    tries = [line for line in run.console.grub if "trial boot of slot A" in line]
    assert [line.rsplit(" ", 1)[-1] for line in tries] == ["2", "1", "0"], context
    assert len(run.console.panics) == 3, context
    assert any("slot A used up its trial boots" in line for line in run.console.grub), context
    # 4. PERSIST survived the upgrade and the fallback.
    assert _cat(run, MARKER) == ["written-by-v1"], context
    assert run.powered_off, context
    env = _grubenv(node)
    assert env.get("kubeos_default") == "B", env  # the default is unchanged
    assert env.get("kubeos_trial", "") == "" and env.get("kubeos_tries", "") == "", env  # trial cleared
    assert env.get("kubeos_trial_failed") == "A" and env.get("kubeos_A_bootable") == "no", env

    # The failed slot is not offered again: a new trial of it is refused until it is rewritten.
    again = run_module("kubeos.os.boot_slot", {"device": disk, "state": "trial", "slot": "A"})
    assert again.failed and "not bootable" in again.msg


def test_a_write_killed_midway_leaves_a_disk_that_boots_the_committed_slot(
    node: Path, tmp_path: Path, run_module: Callable[..., Any], testos: TestOS, qemu: Qemu
) -> None:
    # 6. slot_write of v2 into B through ansible-playbook, killed with SIGKILL half-way through.
    kill_slot_write_midway(
        tmp_path / "killed", REPO / "collections", node, testos.ext4("v2"), testos.sha256("rootfs-v2.ext4")
    )

    env_after = _grubenv(node)
    assert env_after.get("kubeos_B_bootable") == "no", env_after
    refused = run_module("kubeos.os.boot_slot", {"device": str(node), "state": "trial", "slot": "B"})
    assert refused.failed and "not bootable" in refused.msg

    run = qemu.boot(node, timeout=BOOT_TIMEOUT)
    assert _booted(run) == [("A", "v1")], _context(run)
    assert run.powered_off, _context(run)
