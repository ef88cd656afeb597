# Copyright: kubeos contributors
# Apache License 2.0 (see LICENSE)
"""Block devices, partitions, loop devices and temporary mounts.

Everything here runs external tools as argument lists with ``LC_ALL=C`` and reads
their machine-readable output (``sfdisk --json``, ``blkid -p -o export``).
Partitions are identified by what they contain (PARTLABEL, PARTUUID, filesystem
label), never by guessing at device names.
"""

from __future__ import annotations

__metaclass__ = type

import contextlib
import json
import os
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

C_ENV = {"LC_ALL": "C", "LANG": "C"}


class CommandError(Exception):
    """An external command failed; carries everything needed to report it."""

    def __init__(self, argv: Sequence[str], rc: int, out: str, err: str) -> None:
        self.argv = list(argv)
        self.rc = rc
        self.out = out
        self.err = err
        detail = err.strip() or out.strip() or "no output"
        super().__init__(f"`{' '.join(self.argv)}` failed with exit code {rc}: {detail}")


class DeviceError(Exception):
    """A device cannot be used the way it was asked to be used."""


@dataclass
class Result:
    rc: int
    out: str
    err: str


def run(argv: Sequence[str], *, input: bytes | None = None, check: bool = True) -> Result:
    """Run a command (never through a shell) in the C locale."""
    env = dict(os.environ)
    env.update(C_ENV)
    proc = subprocess.run(list(argv), input=input, capture_output=True, env=env, check=False)
    res = Result(proc.returncode, proc.stdout.decode("utf-8", "replace"), proc.stderr.decode("utf-8", "replace"))
    if check and res.rc != 0:
        raise CommandError(argv, res.rc, res.out, res.err)
    return res


def run_bytes(argv: Sequence[str]) -> bytes:
    """Run a command and return its raw standard output."""
    env = dict(os.environ)
    env.update(C_ENV)
    proc = subprocess.run(list(argv), capture_output=True, env=env, check=False)
    if proc.returncode != 0:
        raise CommandError(argv, proc.returncode, "", proc.stderr.decode("utf-8", "replace"))
    return proc.stdout


def is_block_device(path: str) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


def device_size(path: str) -> int:
    """Size in bytes of a block device or a regular file."""
    with open(path, "rb") as handle:
        return handle.seek(0, os.SEEK_END)


def settle() -> None:
    """Wait for udev, where it runs, to finish creating device nodes."""
    if os.path.exists("/run/udev/control"):
        run(["udevadm", "settle", "--timeout=10"], check=False)


def sync_kernel_partitions(disk: str) -> None:
    """Make the kernel's partitions of ``disk`` match its partition table.

    ``losetup --partscan`` and BLKRRPART do not create partitions on every kernel (seen on a
    VM kernel here); ``partx --update`` (BLKPG, one partition at a time) always does.
    """
    run(["partx", "--update", disk], check=False)
    settle()


def _partition_ready(node: str) -> bool:
    return is_block_device(node) and os.path.exists(os.path.join("/sys/class/block", os.path.basename(node)))


def wait_for_nodes(disk: str, nodes: Sequence[str], timeout: float = 10.0) -> None:
    """Wait until the kernel has ``disk``'s partitions and their device nodes exist.

    A loop device that was just detached by someone else is torn down by the kernel in the
    background; its old partitions can vanish after this binding's appeared. Asking the kernel
    again (partx) while waiting covers that.
    """
    deadline = time.monotonic() + timeout
    next_sync = time.monotonic() + 1.0
    missing = [n for n in nodes if not _partition_ready(n)]
    while missing and time.monotonic() < deadline:
        if time.monotonic() >= next_sync:
            sync_kernel_partitions(disk)
            next_sync = time.monotonic() + 1.0
        time.sleep(0.05)
        missing = [n for n in nodes if not _partition_ready(n)]
    if missing:
        raise DeviceError(f"partition device nodes of {disk} did not appear: {', '.join(missing)}")


def loop_attach(path: str) -> str:
    """Attach an image file to a new loop device with partition scanning."""
    return run(["losetup", "--find", "--show", "--partscan", path]).out.strip()


def loop_detach(device: str) -> None:
    # The kernel may still hold a partition briefly after an unmount; retry a little.
    for _attempt in range(20):
        res = run(["losetup", "--detach", device], check=False)
        if res.rc == 0:
            return
        if "No such device or address" in res.err:
            return  # already unbound (autoclear after a detach of a device that was still open)
        time.sleep(0.1)
    run(["losetup", "--detach", device])


def loops_over(path: str) -> list[str]:
    """Loop devices already attached over the image file ``path``."""
    res = run(["losetup", "--associated", path, "--noheadings", "--output", "NAME"], check=False)
    return [line.strip() for line in res.out.splitlines() if line.strip()]


def image_in_use(path: str) -> list[str]:
    """Why the image file ``path`` is in use through loop devices attached elsewhere (mounts, holders)."""
    reasons: list[str] = []
    for loop in loops_over(path):
        name = os.path.basename(loop)
        sys_dir = os.path.join("/sys/class/block", name)
        parts = sorted(e for e in os.listdir(sys_dir) if e.startswith(name + "p")) if os.path.isdir(sys_dir) else []
        for node in [loop] + [os.path.join("/dev", p) for p in parts]:
            for point in mount_points(node):
                reasons.append(f"{path} is attached as {loop} and {node} is mounted at {point}")
            holders = os.path.join("/sys/class/block", os.path.basename(node), "holders")
            if os.path.isdir(holders):
                reasons += [f"{path} is attached as {loop} and {node} is held by {h}" for h in os.listdir(holders)]
    return reasons


@contextlib.contextmanager
def attached(path: str, *, writable: bool = True) -> Iterator[str]:
    """Yield a block device for ``path``: the device itself, or a loop device over an image file.

    An image file mounted through a loop device attached elsewhere is refused when ``writable``.
    A loop device made here is detached again, whatever happens inside the block.
    """
    if is_block_device(path):
        yield path
        return
    if not os.path.isfile(path):
        raise DeviceError(
            f"{path} is neither a block device nor an image file; give a disk such as /dev/sdb or an existing image file"
        )
    if writable:
        busy = image_in_use(path)
        if busy:
            raise DeviceError(f"{'; '.join(busy)}. Unmount it and detach the loop device first; nothing was changed")
    device = loop_attach(path)
    try:
        yield device
    finally:
        loop_detach(device)


@dataclass
class Partition:
    """One GPT partition and what blkid finds in it."""

    number: int
    node: str
    start: int
    size: int
    type_guid: str
    partuuid: str
    partlabel: str
    fstype: str = ""
    label: str = ""
    fsuuid: str = ""

    def to_dict(self) -> dict[str, object]:
        return {
            "number": self.number,
            "device": self.node,
            "start": self.start,
            "size": self.size,
            "type": self.type_guid,
            "partuuid": self.partuuid,
            "partlabel": self.partlabel,
            "fstype": self.fstype,
            "label": self.label,
            "fsuuid": self.fsuuid,
        }


@dataclass
class PartitionTable:
    disk: str
    label: str  # "gpt", "dos" or "" when there is none
    sector_size: int
    size: int
    partitions: list[Partition] = field(default_factory=list)

    def by_name(self, name: str) -> Partition | None:
        for part in self.partitions:
            if part.partlabel == name:
                return part
        return None


def probe(node: str) -> dict[str, str]:
    """Low-level probe of a device (no cache): TYPE, LABEL, UUID, PART_ENTRY_* ..."""
    res = run(["blkid", "--probe", "--output", "export", node], check=False)
    # blkid exits 2 when nothing is found on the device.
    if res.rc not in (0, 2):
        raise CommandError(["blkid", "--probe", "--output", "export", node], res.rc, res.out, res.err)
    values: dict[str, str] = {}
    for line in res.out.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key] = value
    return values


NO_TABLE = "does not contain a recognized partition table"


def read_table(disk: str) -> PartitionTable:
    """Read the partition table of ``disk`` (a block device) and probe each partition."""
    size = device_size(disk)
    res = run(["sfdisk", "--json", disk], check=False)
    for _attempt in range(20):
        # A disk without a table says so; any other failure (a loop device still settling after an attach or
        # a detach nearby) is asked again for up to 2 s before the disk counts as holding no table.
        if res.rc == 0 or NO_TABLE in res.err:
            break
        time.sleep(0.1)
        res = run(["sfdisk", "--json", disk], check=False)
    if res.rc != 0 or not res.out.strip():
        return PartitionTable(disk=disk, label="", sector_size=512, size=size)
    table = json.loads(res.out)["partitiontable"]
    sector = int(table.get("sectorsize", 512))
    parts: list[Partition] = []
    for index, entry in enumerate(table.get("partitions", []), start=1):
        node = entry["node"]
        number = _partition_number(node, index)
        parts.append(
            Partition(
                number=number,
                node=node,
                start=int(entry["start"]) * sector,
                size=int(entry["size"]) * sector,
                type_guid=str(entry.get("type", "")).upper(),
                partuuid=str(entry.get("uuid", "")).lower(),
                partlabel=str(entry.get("name", "")),
            )
        )
    if parts:
        # The kernel's view (sysfs), not /dev: a stale node can outlive its partition for a moment.
        if not all(os.path.exists(os.path.join("/sys/class/block", os.path.basename(p.node))) for p in parts):
            sync_kernel_partitions(disk)
        wait_for_nodes(disk, [p.node for p in parts])
    for part in parts:
        info = probe(part.node)
        part.fstype = info.get("TYPE", "")
        part.label = info.get("LABEL", "")
        part.fsuuid = info.get("UUID", "")
    return PartitionTable(disk=disk, label=str(table.get("label", "")), sector_size=sector, size=size, partitions=parts)


def _partition_number(node: str, fallback: int) -> int:
    digits = ""
    for char in reversed(node):
        if not char.isdigit():
            break
        digits = char + digits
    return int(digits) if digits else fallback


def disk_signatures(disk: str) -> list[str]:
    """Describe what ``wipefs`` finds on the whole disk (partition tables, filesystems)."""
    res = run(["wipefs", "--no-act", "--json", disk], check=False)
    if res.rc != 0 or not res.out.strip():
        return []
    found = json.loads(res.out).get("signatures", [])
    return [f"{sig.get('type', '?')} at offset {sig.get('offset', '?')}" for sig in found]


def _major_minor(node: str) -> tuple[int, int]:
    st = os.stat(node)
    return os.major(st.st_rdev), os.minor(st.st_rdev)


def mount_points(node: str) -> list[str]:
    """Where the block device ``node`` is mounted in this mount namespace."""
    try:
        wanted = "%d:%d" % _major_minor(node)
    except OSError:
        return []
    points: list[str] = []
    with open("/proc/self/mountinfo", encoding="utf-8") as handle:
        for line in handle:
            fields = line.split()
            if len(fields) > 4 and fields[2] == wanted:
                points.append(fields[4].replace("\\040", " "))
    return points


def disk_in_use(table: PartitionTable) -> list[str]:
    """Reasons why the disk is in use: mounted partitions, holders (LVM, RAID, dm)."""
    reasons: list[str] = []
    for node in [table.disk] + [p.node for p in table.partitions]:
        for point in mount_points(node):
            reasons.append(f"{node} is mounted at {point}")
        name = os.path.basename(os.path.realpath(node))
        holders_dir = os.path.join("/sys/class/block", name, "holders")
        if os.path.isdir(holders_dir):
            for holder in os.listdir(holders_dir):
                reasons.append(f"{node} is held by {holder}")
    swaps = _active_swaps()
    for node in [table.disk] + [p.node for p in table.partitions]:
        if os.path.realpath(node) in swaps:
            reasons.append(f"{node} is active swap")
    return reasons


def _active_swaps() -> set[str]:
    try:
        with open("/proc/swaps", encoding="utf-8") as handle:
            return {os.path.realpath(line.split()[0]) for line in handle.readlines()[1:] if line.strip()}
    except OSError:
        return set()


@contextlib.contextmanager
def mounted(node: str, *, readonly: bool, fstype: str = "ext4") -> Iterator[str]:
    """Yield a directory where ``node`` is mounted.

    Reuses an existing mount (when it is writable or ``readonly`` is asked); otherwise
    mounts on a private temporary directory and unmounts it again afterwards.
    """
    for point in mount_points(node):
        if readonly or _is_writable_mount(point):
            yield point
            return
    target = tempfile.mkdtemp(prefix="kubeos-mnt-")
    options = ["ro", "noload"] if readonly and fstype in ("ext4", "ext3") else (["ro"] if readonly else [])
    argv = ["mount", "-t", fstype]
    if options:
        argv += ["-o", ",".join(options)]
    argv += [node, target]
    try:
        run(argv)
    except Exception:
        os.rmdir(target)
        raise
    try:
        yield target
    finally:
        try:
            run(["umount", target])
        finally:
            with contextlib.suppress(OSError):
                os.rmdir(target)


def _is_writable_mount(point: str) -> bool:
    return not os.statvfs(point).f_flag & os.ST_RDONLY


# --- vfat contents through mtools (this kernel may not mount vfat) -----------------------------


def vfat_read(node: str, path: str) -> bytes | None:
    """Read ``path`` (``/EFI/BOOT/grub.cfg``) from a FAT filesystem, or None when it is missing."""
    res = subprocess.run(
        ["mcopy", "-n", "-i", node, "::" + path, "-"],
        capture_output=True,
        env={**os.environ, **C_ENV, "MTOOLS_SKIP_CHECK": "1"},
        check=False,
    )
    if res.returncode != 0:
        return None
    return res.stdout


def vfat_write(node: str, path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` on a FAT filesystem, creating directories as needed."""
    env = {**os.environ, **C_ENV, "MTOOLS_SKIP_CHECK": "1"}
    parts = [p for p in path.split("/") if p]
    for depth in range(1, len(parts)):
        directory = "::/" + "/".join(parts[:depth])
        subprocess.run(["mmd", "-D", "s", "-i", node, directory], capture_output=True, env=env, check=False)
    with tempfile.NamedTemporaryFile(prefix="kubeos-vfat-") as tmp:
        tmp.write(data)
        tmp.flush()
        argv = ["mcopy", "-o", "-i", node, tmp.name, "::/" + "/".join(parts)]
        proc = subprocess.run(argv, capture_output=True, env=env, check=False)
        if proc.returncode != 0:
            raise CommandError(argv, proc.returncode, "", proc.stderr.decode("utf-8", "replace"))
