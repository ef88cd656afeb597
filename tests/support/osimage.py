"""Small OS trees and images for the collection's tests (the boot tests build real, bootable ones).

A tree here has what kubeos looks for in a slot: an os-release and a kernel file at
/boot/vmlinuz (a symlink, as distributions ship it). The "kernel" is random bytes: these
images are written and inspected, never booted.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

MIB = 1024 * 1024


def make_os_tree(root: Path, version: str, *, kernel: bool = True, os_release: bool = True) -> Path:
    (root / "etc").mkdir(parents=True, exist_ok=True)
    (root / "usr/lib").mkdir(parents=True, exist_ok=True)
    (root / "boot").mkdir(parents=True, exist_ok=True)
    if os_release:
        (root / "usr/lib/os-release").write_text(
            f'NAME="KubeOS"\nID=kubeos\nVERSION_ID="{version}"\nPRETTY_NAME="KubeOS {version}"\n'
        )
        os.symlink("../usr/lib/os-release", root / "etc/os-release")
    if kernel:
        (root / f"boot/vmlinuz-{version}").write_bytes(os.urandom(256 * 1024))
        os.symlink(f"vmlinuz-{version}", root / "boot/vmlinuz")
        (root / f"boot/initrd.img-{version}").write_bytes(os.urandom(64 * 1024))
        os.symlink(f"initrd.img-{version}", root / "boot/initrd.img")
    (root / "etc/hostname").write_text("kubeos\n")
    return root


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(4 * MIB), b""):
            digest.update(chunk)
    return digest.hexdigest()


def make_tar(tree: Path, out: Path) -> str:
    """A root filesystem archive of ``tree`` (GNU tar, numeric owners, xattrs); returns its sha256."""
    subprocess.run(
        [
            "tar",
            "--create",
            "--file",
            str(out),
            "--directory",
            str(tree),
            "--numeric-owner",
            "--xattrs",
            "--xattrs-include=*",
            "--acls",
            ".",
        ],
        check=True,
    )
    return file_sha256(out)


def make_ext4_image(tree: Path, out: Path, size_mib: int = 64, label: str = "rootfs") -> str:
    """A raw ext4 filesystem image populated from ``tree`` (no mount needed); returns its sha256."""
    with open(out, "wb") as handle:
        handle.truncate(size_mib * MIB)
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-L", label, "-O", "^metadata_csum_seed,^orphan_file", "-d", str(tree), str(out)],
        check=True,
    )
    return file_sha256(out)
