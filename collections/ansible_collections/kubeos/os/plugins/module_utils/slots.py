# Copyright: kubeos contributors
# Apache License 2.0 (see LICENSE)
"""Reading a kubeos disk: its layout, the A/B slots, what each slot holds, and the GRUB state.

The running slot is found by matching the running root (``root=`` on the kernel command line,
or the source of ``/``; or what the caller states) against the slots' PARTUUIDs, filesystem
labels or device numbers — never by guessing from device names. A disk that is not running
(an image file, a disk in a provisioning host) has no running slot; its *active* slot is then
the committed one (``kubeos_default``).
"""

from __future__ import annotations

__metaclass__ = type

import contextlib
import os
import shlex
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

from ansible_collections.kubeos.os.plugins.module_utils import blockdev, grubenv, rootpath
from ansible_collections.kubeos.os.plugins.module_utils.grubcfg import BOOT_ENV_PATH

SLOTS = ("A", "B")
LAYOUT_KUBEOS = "kubeos"
LAYOUT_LEGACY = "kubeos-legacy"

# Partition names (GPT PARTLABEL) and filesystem labels of the kubeos layout.
NAME_BIOS = "BIOS"
NAME_ESP = "ESP"
NAME_BOOT = "BOOT"
NAME_PERSIST = "PERSIST"
SLOT_NAMES = {"A": "ROOT-A", "B": "ROOT-B"}

# Where KubeOS's own image builder keeps the GRUB environment (on its vfat BOOT partition).
LEGACY_ENV_CANDIDATES = ("/EFI/openEuler/grubenv", "/EFI/BOOT/grubenv", "/grub2/grubenv", "/grubenv")

KERNEL_PATH = "/boot/vmlinuz"
INITRD_PATH = "/boot/initrd.img"
OS_RELEASE_PATHS = ("/etc/os-release", "/usr/lib/os-release")
ROOT_FILESYSTEMS = ("ext4", "ext3", "ext2")


class LayoutError(Exception):
    """The disk does not hold a layout kubeos can work with."""


class SlotError(Exception):
    """A slot cannot be used the way it was asked to be used."""


def other_slot(slot: str) -> str:
    return "B" if slot == "A" else "A"


def check_slot_name(slot: str) -> str:
    name = str(slot).strip().upper()
    if name not in SLOTS:
        raise SlotError(f"unknown slot {slot!r}: use A or B")
    return name


@dataclass
class DiskLayout:
    """The partitions of a kubeos (or KubeOS-built) disk, by role."""

    kind: str
    disk: str
    boot: blockdev.Partition
    slots: dict[str, blockdev.Partition]
    persist: blockdev.Partition
    esp: blockdev.Partition | None = None
    bios: blockdev.Partition | None = None
    table: blockdev.PartitionTable | None = None


def recognise(table: blockdev.PartitionTable) -> DiskLayout:
    """Tell which layout ``table`` holds, or raise LayoutError saying what was found instead."""
    parts = table.partitions
    by_name = {p.partlabel: p for p in parts if p.partlabel}
    wanted = [NAME_ESP, NAME_BOOT, SLOT_NAMES["A"], SLOT_NAMES["B"], NAME_PERSIST]
    if table.label == "gpt" and all(n in by_name for n in wanted):
        return DiskLayout(
            kind=LAYOUT_KUBEOS,
            disk=table.disk,
            esp=by_name[NAME_ESP],
            boot=by_name[NAME_BOOT],
            slots={"A": by_name[SLOT_NAMES["A"]], "B": by_name[SLOT_NAMES["B"]]},
            persist=by_name[NAME_PERSIST],
            bios=by_name.get(NAME_BIOS),
            table=table,
        )
    by_label = {p.label: p for p in parts if p.label}
    vfat = [p for p in parts if p.fstype == "vfat"]
    if vfat and all(n in by_label for n in (SLOT_NAMES["A"], SLOT_NAMES["B"], NAME_PERSIST)):
        return DiskLayout(
            kind=LAYOUT_LEGACY,
            disk=table.disk,
            boot=vfat[0],
            slots={"A": by_label[SLOT_NAMES["A"]], "B": by_label[SLOT_NAMES["B"]]},
            persist=by_label[NAME_PERSIST],
            table=table,
        )
    found = ", ".join(
        f"{p.node} ({p.partlabel or 'no name'}, {p.fstype or 'no filesystem'}{', ' + p.label if p.label else ''})"
        for p in parts
    )
    raise LayoutError(
        f"{table.disk} does not hold a kubeos layout (ESP, BOOT, ROOT-A, ROOT-B, PERSIST) nor a KubeOS one "
        f"(vfat BOOT, ROOT-A, ROOT-B, PERSIST); found: {found or 'no partitions'}. "
        "Lay it out with kubeos.os.disk_layout first."
    )


# --- the GRUB environment of a disk --------------------------------------------------------------


@dataclass
class GrubState:
    default: str
    trial: str | None
    tries: int | None
    trial_failed: str | None
    marked_bootable: dict[str, bool]
    env: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        return {
            "default": self.default,
            "trial": self.trial,
            "tries": self.tries,
            "trial_failed": self.trial_failed,
            "marked_bootable": dict(self.marked_bootable),
            "env": dict(self.env),
        }


def grub_state(kind: str, env: Mapping[str, str]) -> GrubState:
    if kind == LAYOUT_LEGACY:
        default = env.get("saved_entry", "A")
        default = default if default in SLOTS else "A"
        return GrubState(default, None, None, None, {"A": True, "B": True}, dict(env))
    default = env.get("kubeos_default", "A")
    trial = env.get("kubeos_trial") or None
    tries_text = env.get("kubeos_tries", "")
    tries = int(tries_text) if tries_text.isdigit() else None
    marked = {s: env.get(f"kubeos_{s}_bootable", "yes") != "no" for s in SLOTS}
    return GrubState(
        default=default if default in SLOTS else "A",
        trial=trial if trial in SLOTS else None,
        tries=tries,
        trial_failed=env.get("kubeos_trial_failed") or None,
        marked_bootable=marked,
        env=dict(env),
    )


class BootEnv:
    """Read and atomically write the GRUB environment block of a disk."""

    def __init__(self, layout: DiskLayout) -> None:
        self.layout = layout

    def _legacy_path(self) -> str:
        for candidate in LEGACY_ENV_CANDIDATES:
            if blockdev.vfat_read(self.layout.boot.node, candidate) is not None:
                return candidate
        return LEGACY_ENV_CANDIDATES[0]

    def read(self) -> dict[str, str]:
        if self.layout.kind == LAYOUT_LEGACY:
            data = blockdev.vfat_read(self.layout.boot.node, self._legacy_path())
            return grubenv.parse(data) if data else {}
        with blockdev.mounted(self.layout.boot.node, readonly=True) as root:
            path = os.path.join(root, BOOT_ENV_PATH)
            if not os.path.exists(path):
                return {}
            return grubenv.read(path)

    def write(self, env: Mapping[str, str]) -> None:
        if self.layout.kind == LAYOUT_LEGACY:
            # FAT has no atomic rename; mtools overwrites the 1 KiB block in place.
            blockdev.vfat_write(self.layout.boot.node, self._legacy_path(), grubenv.encode(env))
            return
        with blockdev.mounted(self.layout.boot.node, readonly=False) as root:
            path = os.path.join(root, BOOT_ENV_PATH)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            grubenv.write_atomic(path, env)

    def update(self, set_vars: Mapping[str, str | None]) -> tuple[dict[str, str], dict[str, str]]:
        """Apply ``set_vars`` (None unsets); return (before, after). Writes only when something changes."""
        before = self.read()
        after = grubenv.update(before, set_vars)
        if after != before:
            self.write(after)
        return before, after


# --- what a slot holds ---------------------------------------------------------------------------


def resolve_in_root(root: str, path: str) -> str | None:
    """The host path of ``path`` inside the tree at ``root`` (links followed within it), or None when
    it does not exist or loops. A slot's ``/boot/vmlinuz -> vmlinuz-6.1`` or ``/etc/os-release ->
    ../usr/lib/os-release`` resolve to files of that slot, never to files of the host."""
    try:
        inside = rootpath.resolve(root, path)
    except rootpath.LinkLoopError:
        return None
    full = os.path.join(root, inside.lstrip("/")) if inside != "/" else root
    return full if os.path.lexists(full) else None


def parse_os_release(text: str) -> dict[str, str]:
    values: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _sep, raw = line.partition("=")
        try:
            words = shlex.split(raw)
        except ValueError:
            words = [raw.strip("\"'")]
        values[key.strip()] = " ".join(words)
    return values


@dataclass
class SlotContent:
    os_release: dict[str, str] = field(default_factory=dict)
    has_kernel: bool = False
    has_initrd: bool = False

    @property
    def version(self) -> str:
        return self.os_release.get("VERSION_ID") or self.os_release.get("VERSION") or ""

    @property
    def pretty_name(self) -> str:
        return self.os_release.get("PRETTY_NAME", "")


def inspect_tree(root: str) -> SlotContent:
    """What an OS tree mounted (or unpacked) at ``root`` holds."""
    content = SlotContent()
    for candidate in OS_RELEASE_PATHS:
        found = resolve_in_root(root, candidate)
        if found and os.path.isfile(found):
            with open(found, encoding="utf-8", errors="replace") as handle:
                content.os_release = parse_os_release(handle.read())
            break
    kernel = resolve_in_root(root, KERNEL_PATH)
    content.has_kernel = bool(kernel and os.path.isfile(kernel) and os.path.getsize(kernel) > 0)
    initrd = resolve_in_root(root, INITRD_PATH)
    content.has_initrd = bool(initrd and os.path.isfile(initrd))
    return content


def inspect_slot(part: blockdev.Partition) -> SlotContent:
    """Mount a slot read-only (or use its existing mount) and look at what it holds."""
    if part.fstype not in ROOT_FILESYSTEMS:
        return SlotContent()
    try:
        with blockdev.mounted(part.node, readonly=True, fstype=part.fstype) as root:
            return inspect_tree(root)
    except blockdev.CommandError:
        # A half-written or damaged filesystem: nothing bootable there.
        return SlotContent()


# --- the running root ----------------------------------------------------------------------------


def kernel_cmdline(path: str = "/proc/cmdline") -> dict[str, str]:
    try:
        with open(path, encoding="utf-8") as handle:
            words = handle.read().split()
    except OSError:
        return {}
    args: dict[str, str] = {}
    for word in words:
        key, _sep, value = word.partition("=")
        args[key] = value
    return args


def root_mount_source() -> str | None:
    """The device mounted at ``/`` in this mount namespace, from /proc/self/mountinfo."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as handle:
            for line in handle:
                fields = line.split()
                if len(fields) > 9 and fields[4] == "/":
                    sep = fields.index("-")
                    source = fields[sep + 2]
                    if source.startswith("/dev/"):
                        return source
    except (OSError, ValueError):
        return None
    return None


def running_root_spec(explicit: str | None = None) -> str | None:
    """The running root as stated (tests, image builds), on the kernel command line, or mounted at /."""
    if explicit:
        return explicit.strip()
    root = kernel_cmdline().get("root")
    if root:
        return root
    return root_mount_source()


def matches_root(part: blockdev.Partition, spec: str) -> bool:
    """Does the root specification ``spec`` (``PARTUUID=…``, ``LABEL=…``, ``/dev/…``) name ``part``?"""
    key, sep, value = spec.partition("=")
    if sep and key in ("PARTUUID", "PARTLABEL", "LABEL", "UUID"):
        value = value.strip().strip('"')
        if key == "PARTUUID":
            return part.partuuid.lower() == value.lower()
        if key == "PARTLABEL":
            return part.partlabel == value
        if key == "LABEL":
            return part.label == value
        return part.fsuuid.lower() == value.lower()
    if spec.startswith("/dev/"):
        try:
            want = os.stat(spec).st_rdev
            have = os.stat(part.node).st_rdev
        except OSError:
            return os.path.realpath(spec) == os.path.realpath(part.node)
        return want == have
    return False


def running_slot(layout: DiskLayout, spec: str | None) -> str | None:
    if not spec:
        return None
    for name, part in layout.slots.items():
        if matches_root(part, spec):
            return name
    return None


def disk_of_root(spec: str | None) -> str:
    """The whole disk that holds the running root partition."""
    if not spec:
        raise LayoutError("cannot tell the running root: no root= on the kernel command line; give device explicitly")
    node: str | None = None
    if spec.startswith("/dev/"):
        node = os.path.realpath(spec)
    else:
        key, _sep, value = spec.partition("=")
        token = {"PARTUUID": "PARTUUID", "PARTLABEL": "PARTLABEL", "LABEL": "LABEL", "UUID": "UUID"}.get(key)
        if token:
            res = blockdev.run(
                ["blkid", "--list-one", "--output", "device", "--match-token", f"{token}={value}"],
                check=False,
            )
            node = res.out.strip() or None
    if not node or not blockdev.is_block_device(node):
        raise LayoutError(f"cannot find the device of the running root {spec!r}; give device explicitly")
    name = os.path.basename(node)
    sys_path = os.path.realpath(os.path.join("/sys/class/block", name))
    if not os.path.exists(os.path.join(sys_path, "partition")):
        raise LayoutError(f"the running root {node} is not a partition of a disk; give device explicitly")
    return os.path.join("/dev", os.path.basename(os.path.dirname(sys_path)))


# --- everything together -------------------------------------------------------------------------


@dataclass
class SlotFacts:
    name: str
    part: blockdev.Partition
    content: SlotContent
    marked_bootable: bool

    @property
    def bootable(self) -> bool:
        return self.marked_bootable and self.content.has_kernel and bool(self.content.os_release)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "device": self.part.node,
            "partuuid": self.part.partuuid,
            "partlabel": self.part.partlabel,
            "label": self.part.label,
            "fstype": self.part.fstype,
            "size": self.part.size,
            "version": self.content.version,
            "pretty_name": self.content.pretty_name,
            "os_release": dict(self.content.os_release),
            "has_kernel": self.content.has_kernel,
            "has_initrd": self.content.has_initrd,
            "marked_bootable": self.marked_bootable,
            "bootable": self.bootable,
        }


@dataclass
class DiskState:
    layout: DiskLayout
    grub: GrubState
    slots: dict[str, SlotFacts]
    running_root: str | None
    running_slot: str | None

    @property
    def active_slot(self) -> str:
        return self.running_slot or self.grub.default

    @property
    def inactive_slot(self) -> str:
        return other_slot(self.active_slot)

    def protected_slots(self) -> dict[str, str]:
        """Slots that must not be written, with the reason."""
        reasons: dict[str, str] = {}
        if self.running_slot:
            reasons[self.running_slot] = f"slot {self.running_slot} is the running system"
        default = self.grub.default
        if default not in reasons and self.slots[default].marked_bootable and self.slots[default].content.os_release:
            reasons[default] = f"slot {default} is the committed slot that the disk falls back to" + (
                f" while slot {self.grub.trial} is on trial" if self.grub.trial else ""
            )
        return reasons

    def to_dict(self) -> dict[str, Any]:
        layout = self.layout
        return {
            "layout": layout.kind,
            "disk": layout.disk,
            "running_root": self.running_root,
            "running_slot": self.running_slot,
            "active_slot": self.active_slot,
            "active_source": "running-root" if self.running_slot else "committed",
            "inactive_slot": self.inactive_slot,
            "slots": {name: facts.to_dict() for name, facts in self.slots.items()},
            "grub": self.grub.to_dict(),
            "boot": layout.boot.to_dict(),
            "esp": layout.esp.to_dict() if layout.esp else None,
            "persist": layout.persist.to_dict(),
            "bios_boot": layout.bios is not None,
        }


def read_state(disk: str, running_root: str | None = None, *, inspect: bool = True) -> DiskState:
    """Everything about a kubeos disk (a block device; attach image files with blockdev.attached)."""
    layout = recognise(blockdev.read_table(disk))
    env = BootEnv(layout).read()
    grub = grub_state(layout.kind, env)
    spec = running_root_spec(running_root)
    slots = {
        name: SlotFacts(
            name=name,
            part=part,
            content=inspect_slot(part) if inspect else SlotContent(),
            marked_bootable=grub.marked_bootable[name],
        )
        for name, part in layout.slots.items()
    }
    return DiskState(layout=layout, grub=grub, slots=slots, running_root=spec, running_slot=running_slot(layout, spec))


@contextlib.contextmanager
def open_disk(device: str | None, running_root: str | None = None, *, writable: bool = True) -> Iterator[str]:
    """Yield the block device of the disk to work on: ``device`` (image files get a loop device)
    or, when no device is given, the disk that holds the running root."""
    if device:
        with blockdev.attached(device, writable=writable) as disk:
            yield disk
    else:
        yield disk_of_root(running_root_spec(running_root))
