"""Smoke test: a disk laid out and filled by the kubeos.os modules boots slot A under QEMU (OVMF, GRUB)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from vmtest.qemu import Qemu

from .conftest import TestOS, console_tail

pytestmark = [pytest.mark.loop, pytest.mark.slow]


def test_committed_slot_a_boots_v1(
    image_file: Callable[..., Path], run_module: Callable[..., Any], testos: TestOS, qemu: Qemu
) -> None:
    disk = image_file("node.img", size_mib=1536)
    layout = run_module(
        "kubeos.os.disk_layout",
        {"device": str(disk), "root_size": "512MiB", "kernel_args": "console=ttyS0", "panic_timeout": 1},
    )
    assert not layout.failed, layout.msg
    written = run_module("kubeos.os.slot_write", {"device": str(disk), "slot": "A", **testos.slot_write_args("v1")})
    assert not written.failed, written.msg
    committed = run_module("kubeos.os.boot_slot", {"device": str(disk), "state": "committed", "slot": "A"})
    assert not committed.failed, committed.msg

    run = qemu.boot(disk, timeout=240)
    print(f"boot: {run.summary()}")  # seconds per boot, shown with pytest -s or -rA

    context = f"{run.summary()}\nconsole ({run.log}):\n{console_tail(run.console)}"
    assert [(b.slot, b.version) for b in run.boots] == [("A", "v1")], context
    boot = run.boots[0]
    assert boot.fields["check"] == "ok", context
    assert "kubeos.slot=A" in boot.cmdline.split(), context
    assert "panic=1" in boot.cmdline.split(), context
    assert "console=ttyS0" in boot.cmdline.split(), context
    assert "kubeos: booting slot A" in " ".join(run.console.grub), context
    assert run.powered_off, context
