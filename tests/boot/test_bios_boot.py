"""A disk laid out with ``bios_boot: true`` boots under legacy BIOS (QEMU's SeaBIOS) as well."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from vmtest.qemu import Qemu

from .conftest import TestOS, console_tail

pytestmark = [pytest.mark.loop, pytest.mark.slow]


def test_bios_boot_partition_gets_grub_and_the_disk_boots_under_seabios(
    image_file: Callable[..., Path], run_module: Callable[..., Any], testos: TestOS, tmp_path: Path
) -> None:
    disk = image_file("bios.img", size_mib=1024)
    args = {
        "device": str(disk),
        "root_size": "256MiB",
        "bios_boot": True,
        "kernel_args": "console=ttyS0",
        "panic_timeout": 1,
    }
    layout = run_module("kubeos.os.disk_layout", args)
    assert layout.changed and not layout.failed, layout.msg
    assert any("GRUB for BIOS" in action for action in layout.result["actions"])
    again = run_module("kubeos.os.disk_layout", args)
    assert not again.changed and not again.failed, again.result
    for name, extra in (
        ("kubeos.os.slot_write", {"slot": "A", **testos.slot_write_args("v1")}),
        ("kubeos.os.boot_slot", {"state": "committed", "slot": "A"}),
    ):
        res = run_module(name, {"device": str(disk), **extra})
        assert not res.failed, res.msg

    qemu = Qemu(tmp_path / "qemu", firmware="bios")
    try:
        run = qemu.boot(disk, timeout=240)
    finally:
        qemu.close()
    context = f"{run.summary()}\n{console_tail(run.console)}"
    assert [(b.slot, b.version) for b in run.boots] == [("A", "v1")], context
    assert "kubeos: booting slot A" in " ".join(run.console.grub), context
    assert run.powered_off, context
