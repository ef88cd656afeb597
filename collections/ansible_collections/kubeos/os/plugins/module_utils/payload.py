# Copyright: kubeos contributors
# Apache License 2.0 (see LICENSE)
"""Upgrade payloads: a root filesystem turned into an ext4 image, its sha256 and a manifest.

The manifest is what ``slot_write`` needs to consume the payload (format, size, sha256) plus
the OS version, and a fingerprint of the source so that building the same root filesystem
again changes nothing.
"""

from __future__ import annotations

__metaclass__ = type

import hashlib
import json
import os
import stat
import tempfile
from dataclasses import asdict, dataclass
from typing import Any

from ansible_collections.kubeos.os.plugins.module_utils import atomicfile, blockdev, layout, slots

MANIFEST_VERSION = 1
MIB = 1024 * 1024


class PayloadError(Exception):
    """The payload cannot be built from what was given."""


@dataclass
class Manifest:
    name: str
    version: str
    format: str
    file: str
    size: int
    sha256: str
    os_release: dict[str, str]
    source: str
    source_fingerprint: str
    manifest_version: int = MANIFEST_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while True:
            chunk = handle.read(4 * MIB)
            if not chunk:
                return digest.hexdigest()
            digest.update(chunk)


def tree_fingerprint(root: str) -> str:
    """A cheap fingerprint of a directory tree: names, types, modes, owners, sizes, mtimes, link targets."""
    digest = hashlib.sha256()
    for directory, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = os.path.join(directory, name)
            st = os.lstat(path)
            rel = os.path.relpath(path, root)
            link = os.readlink(path) if stat.S_ISLNK(st.st_mode) else ""
            digest.update(
                f"{rel}\0{st.st_mode}\0{st.st_uid}\0{st.st_gid}\0{st.st_size}\0{st.st_mtime_ns}\0{link}\n".encode(
                    "utf-8", "surrogateescape"
                )
            )
    return "tree:" + digest.hexdigest()


def source_fingerprint(rootfs: str) -> str:
    if os.path.isdir(rootfs):
        return tree_fingerprint(rootfs)
    if os.path.isfile(rootfs):
        return "tar:" + sha256_file(rootfs)
    raise PayloadError(f"root filesystem {rootfs} is neither a directory nor a tar archive file")


def tree_bytes(root: str) -> int:
    total = 0
    for directory, _dirs, filenames in os.walk(root):
        for name in filenames:
            st = os.lstat(os.path.join(directory, name))
            total += st.st_blocks * 512 if stat.S_ISREG(st.st_mode) else 0
    return total


def filesystem_size(content_bytes: int, requested: int | None) -> int:
    """Room for the content plus a third, inodes and journal; whole MiB."""
    if requested:
        if requested < content_bytes:
            raise PayloadError(
                f"size {requested // MIB} MiB is smaller than the root filesystem ({content_bytes // MIB} MiB); "
                "leave size empty to size the image automatically"
            )
        return -(-requested // MIB) * MIB
    wanted = int(content_bytes * 1.33) + 48 * MIB
    return -(-wanted // MIB) * MIB


def read_manifest(path: str) -> Manifest | None:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
        return Manifest(**data)
    except (OSError, ValueError, TypeError):
        return None


def build(
    rootfs: str,
    dest: str,
    *,
    name: str,
    version: str | None = None,
    size: int | None = None,
    label: str = "kubeos-root",
    force: bool = False,
    check_mode: bool = False,
) -> tuple[bool, Manifest | None, str]:
    """Build ``dest/<name>.ext4`` (+ ``.sha256`` and ``.json``) from ``rootfs`` (a directory or a tar).

    Returns (changed, manifest, manifest path). In check mode the manifest is None when it would change.
    """
    fingerprint = source_fingerprint(rootfs)
    image = os.path.join(dest, f"{name}.ext4")
    manifest_path = os.path.join(dest, f"{name}.json")
    existing = read_manifest(manifest_path)
    if (
        not force
        and existing is not None
        and existing.source_fingerprint == fingerprint
        and os.path.isfile(image)
        and os.path.getsize(image) == existing.size
        and (version is None or existing.version == version)
    ):
        return False, existing, manifest_path
    if check_mode:
        return True, None, manifest_path
    os.makedirs(dest, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kubeos-rootfs-", dir=dest) as work:
        tree = rootfs
        if not os.path.isdir(rootfs):
            tree = os.path.join(work, "tree")
            os.mkdir(tree)
            blockdev.run(
                [
                    "tar",
                    "--extract",
                    f"--file={rootfs}",
                    f"--directory={tree}",
                    "--numeric-owner",
                    "--preserve-permissions",
                    "--same-owner",
                    "--xattrs",
                    "--xattrs-include=*",
                    "--acls",
                ]
            )
        content = slots.inspect_tree(tree)
        if not content.os_release:
            raise PayloadError(
                f"{rootfs} holds no /etc/os-release or /usr/lib/os-release: it is not an OS root filesystem"
            )
        if not content.has_kernel:
            raise PayloadError(f"{rootfs} holds no kernel at {slots.KERNEL_PATH}: the slot would not boot")
        os_version = version or content.version
        if not os_version:
            raise PayloadError(f"{rootfs}: its os-release has no VERSION_ID or VERSION; give version explicitly")
        fs_size = filesystem_size(tree_bytes(tree), size)
        partial = os.path.join(work, "image.ext4")
        with open(partial, "wb") as handle:
            handle.truncate(fs_size)
        blockdev.run(["mkfs.ext4", "-q", "-F", "-L", label, "-O", layout.EXT4_FEATURES, "-d", tree, partial])
        digest = sha256_file(partial)
        os.replace(partial, image)
    manifest = Manifest(
        name=name,
        version=os_version,
        format="raw",
        file=os.path.basename(image),
        size=os.path.getsize(image),
        sha256=digest,
        os_release=content.os_release,
        source=os.path.abspath(rootfs),
        source_fingerprint=fingerprint,
    )
    atomicfile.replace(image + ".sha256", f"{digest}  {os.path.basename(image)}\n".encode())
    atomicfile.replace(manifest_path, (json.dumps(manifest.to_dict(), indent=2, sort_keys=True) + "\n").encode())
    return True, manifest, manifest_path
