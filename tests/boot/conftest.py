"""Fixtures of the boot tests: the test OS (built and cached by tools/vmtest/testos/build.py), QEMU runs that
are always killed at the end, and host access to a disk image's PERSIST partition while the VM is off.

Tests here need root, QEMU (qemu-system-x86), OVMF, busybox-static, apt (for the Debian kernel package) and
the collection's own tools (sfdisk, mkfs, mtools, grub-mkimage). The test OS cache is
``$KUBEOS_TESTOS_CACHE`` (default /var/cache/kubeos/testos); a cold build takes about 15 s.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from vmtest.disk import mounted_partition
from vmtest.qemu import QEMU, Console, Qemu, QemuError, ovmf_files, qemu_session
from vmtest.testos import build as testos_build


@dataclass
class TestOS:
    """The built test OS: kernel, initramfs and the root filesystems of v1, v2 (boot) and v3 (panics)."""

    manifest: dict[str, Any]

    __test__ = False  # not a test class for pytest

    @property
    def dir(self) -> Path:
        return Path(self.manifest["dir"])

    def path(self, key: str) -> Path:
        return Path(self.manifest["paths"][key])

    def sha256(self, key: str) -> str:
        return str(self.manifest["files"][key]["sha256"])

    def ext4(self, version: str) -> Path:
        return self.path(f"rootfs-{version}.ext4")

    def tar(self, version: str) -> Path:
        return self.path(f"rootfs-{version}.tar")

    def slot_write_args(self, version: str, fmt: str = "raw") -> dict[str, str]:
        """src, sha256 and format for kubeos.os.slot_write."""
        key = f"rootfs-{version}.{'ext4' if fmt == 'raw' else 'tar'}"
        return {"src": f"file://{self.path(key)}", "sha256": self.sha256(key), "format": fmt}


def _require_boot_tools() -> None:
    if os.geteuid() != 0:
        pytest.skip("boot tests need root (loop devices, mkfs, mount)")
    if not shutil.which(QEMU):
        pytest.skip(f"{QEMU} is not installed (Debian package qemu-system-x86)")
    try:
        ovmf_files()
    except QemuError as exc:
        pytest.skip(str(exc))
    if not Path(testos_build.BUSYBOX).is_file():
        pytest.skip("busybox-static is not installed")


@pytest.fixture(scope="session")
def testos() -> TestOS:
    """Build the test OS, or find it up to date in the cache."""
    _require_boot_tools()
    lines: list[str] = []
    try:
        manifest = testos_build.ensure(log=lines.append)
    except testos_build.BuildError as exc:
        pytest.fail(f"building the test OS failed: {exc}\n" + "\n".join(lines))
    return TestOS(manifest)


@pytest.fixture
def qemu(tmp_path: Path) -> Iterator[Qemu]:
    """Start QEMU runs with ``qemu.boot(image)``; every QEMU still running at the end is killed."""
    _require_boot_tools()
    with qemu_session(tmp_path / "qemu") as machine:
        yield machine


@pytest.fixture
def persist() -> Callable[..., contextlib.AbstractContextManager[Path]]:
    """``with persist(image) as root:`` mounts the image's PERSIST on the host (the VM must be off)."""
    return mounted_partition


def console_tail(console: Console, lines: int = 60) -> str:
    return "\n".join(console.lines[-lines:])
