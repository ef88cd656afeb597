"""Kernel arguments set with kubeos.os.sysconfig (grub.cmdline.next) reach the kernel of the other slot, proven
by booting: the test OS prints its /proc/cmdline on the console. The running slot's arguments stay as they were."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from vmtest.disk import queue_actions
from vmtest.qemu import Qemu

from .conftest import TestOS, console_tail

pytestmark = [pytest.mark.loop, pytest.mark.slow]

BOOT_TIMEOUT = 240


@pytest.fixture
def node(image_file: Callable[..., Path], run_module: Callable[..., Any], testos: TestOS) -> Path:
    """A provisioned node: v1 in slot A, committed; v2 written into slot B (bootable, not armed)."""
    disk = image_file("node.img", size_mib=1024)
    steps = [
        (
            "kubeos.os.disk_layout",
            {"device": str(disk), "root_size": "256MiB", "kernel_args": "console=ttyS0", "panic_timeout": 1},
        ),
        ("kubeos.os.slot_write", {"device": str(disk), "slot": "A", **testos.slot_write_args("v1")}),
        ("kubeos.os.boot_slot", {"device": str(disk), "state": "committed", "slot": "A"}),
        ("kubeos.os.slot_write", {"device": str(disk), "slot": "B", **testos.slot_write_args("v2")}),
    ]
    for name, args in steps:
        res = run_module(name, args)
        assert not res.failed, f"{name}: {res.msg}"
    return disk


def test_grub_cmdline_next_reaches_the_other_slots_kernel_and_not_the_running_ones(
    node: Path, tmp_path: Path, run_module: Callable[..., Any], qemu: Qemu
) -> None:
    disk = str(node)
    empty_root = tmp_path / "root"
    empty_root.mkdir()
    configs = [
        {
            "model": "grub.cmdline.next",
            "contents": [{"key": "kubeos.testarg", "value": 1}, {"key": "kubeos.testflag", "value": ""}],
        }
    ]
    res = run_module("kubeos.os.sysconfig", {"device": disk, "root": str(empty_root), "configs": configs})
    assert res.status == "changed" and res.result["results"][0]["slot"] == "B", res.msg

    trial = run_module("kubeos.os.boot_slot", {"device": disk, "state": "trial", "slot": "B", "tries": 1})
    assert not trial.failed, trial.msg

    # Boot 1: B on trial, then reboot; boot 2: the trial is used up, GRUB falls back to A.
    queue_actions(node, ["reboot", "poweroff"])
    run = qemu.boot(node, timeout=2 * BOOT_TIMEOUT)
    context = f"{run.summary()}\n{console_tail(run.console, 80)}"
    assert [(b.slot, b.version) for b in run.boots] == [("B", "v2"), ("A", "v1")], context
    next_words = run.boots[0].cmdline.split()
    assert "kubeos.testarg=1" in next_words and "kubeos.testflag" in next_words, context
    assert "kubeos.slot=B" in next_words and "console=ttyS0" in next_words, context
    running_words = run.boots[1].cmdline.split()
    assert not any(word.startswith("kubeos.test") for word in running_words), context
    assert "kubeos.slot=A" in running_words, context
    assert all(b.fields.get("check") == "ok" for b in run.boots), context
