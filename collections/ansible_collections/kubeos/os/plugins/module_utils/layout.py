# Copyright: kubeos contributors
# Apache License 2.0 (see LICENSE)
"""Creating and checking the kubeos disk layout: ESP | BOOT | ROOT-A | ROOT-B | PERSIST.

``plan()`` compares the disk with the wanted layout and returns the list of actions, without
touching anything (that is what check mode shows); ``apply()`` carries them out.
"""

from __future__ import annotations

__metaclass__ = type

import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field

from ansible_collections.kubeos.os.plugins.module_utils import atomicfile, biosboot, blockdev, grubcfg, grubenv, slots

MIB = 1024 * 1024
GPT_ESP = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
GPT_BIOS = "21686148-6449-6E6F-744E-656564454649"
GPT_LINUX = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
# GRUB 2.06 cannot read ext4 with metadata_csum_seed; old kernels lack orphan_file.
EXT4_FEATURES = "^metadata_csum_seed,^orphan_file"
ALIGN = MIB
# What a fresh PERSIST holds: the upper and work directories of the /etc overlay, /var, and
# the agent's own directory (journal, staged downloads). Made only when PERSIST is created.
PERSIST_DIRS = ("etc-overlay/upper", "etc-overlay/work", "var", "kubeos/journal")

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


class LayoutError(Exception):
    """The layout cannot be made on this disk as asked."""


def parse_size(value: object, what: str) -> int:
    """``64MiB``, ``2G``, ``1.5GiB``, ``4096`` (bytes) → bytes. Units are powers of 1024."""
    if isinstance(value, int):
        return value
    match = _SIZE_RE.match(str(value))
    if not match:
        raise LayoutError(f"{what}: cannot read the size {value!r}; write it like 64MiB, 2GiB or 512M")
    number, unit = float(match.group(1)), match.group(2).lower()
    factor = {"": 1, "k": 1024, "m": MIB, "g": MIB * 1024, "t": MIB * 1024 * 1024}[unit]
    return int(number * factor)


@dataclass
class PartSpec:
    name: str
    type_guid: str
    size: int | None  # None: the rest of the disk


@dataclass
class LayoutSpec:
    esp_size: int = 64 * MIB
    boot_size: int = 64 * MIB
    root_size: int = 2048 * MIB
    persist_size: int | None = None
    bios_boot: bool = False
    kernel_args: str = ""
    grub_timeout: int = 0
    panic_timeout: int = 10

    def partitions(self) -> list[PartSpec]:
        """The partitions in disk order."""
        parts: list[PartSpec] = []
        if self.bios_boot:
            parts.append(PartSpec(slots.NAME_BIOS, GPT_BIOS, MIB))
        parts += [
            PartSpec(slots.NAME_ESP, GPT_ESP, self.esp_size),
            PartSpec(slots.NAME_BOOT, GPT_LINUX, self.boot_size),
            PartSpec(slots.SLOT_NAMES["A"], GPT_LINUX, self.root_size),
            PartSpec(slots.SLOT_NAMES["B"], GPT_LINUX, self.root_size),
            PartSpec(slots.NAME_PERSIST, GPT_LINUX, self.persist_size),
        ]
        return parts

    def validate(self, disk_size: int) -> None:
        for name, size in (
            ("esp_size", self.esp_size),
            ("boot_size", self.boot_size),
            ("root_size", self.root_size),
        ):
            if size % ALIGN:
                raise LayoutError(f"{name} must be a whole number of MiB, got {size} bytes")
        if self.esp_size < 32 * MIB:
            raise LayoutError("esp_size must be at least 32MiB (the GRUB EFI image and FAT need room)")
        if self.boot_size < 16 * MIB:
            raise LayoutError("boot_size must be at least 16MiB")
        if self.root_size < 64 * MIB:
            raise LayoutError("root_size must be at least 64MiB")
        if self.persist_size is not None and (self.persist_size < 16 * MIB or self.persist_size % ALIGN):
            raise LayoutError("persist_size must be a whole number of MiB, at least 16MiB")
        fixed = sum(p.size for p in self.partitions() if p.size is not None)
        # 1 MiB in front for alignment, 1 MiB behind for the backup GPT, 16 MiB minimum PERSIST.
        needed = fixed + 2 * MIB + (0 if self.persist_size is not None else 16 * MIB)
        if needed > disk_size:
            raise LayoutError(
                f"the layout needs {needed // MIB} MiB but the disk has {disk_size // MIB} MiB; "
                "use a bigger disk or smaller sizes (root_size is counted twice, once per slot)"
            )

    def sfdisk_script(self) -> str:
        lines = ["label: gpt", "first-lba: 2048"]
        for part in self.partitions():
            size_field = f"size={part.size // 512}, " if part.size is not None else ""
            lines.append(f'{size_field}type={part.type_guid}, name="{part.name}"')
        return "\n".join(lines) + "\n"


@dataclass
class Plan:
    """What ``apply`` would do, in order."""

    actions: list[str] = field(default_factory=list)
    repartition: bool = False
    format_parts: list[str] = field(default_factory=list)
    write_esp: bool = False
    write_bios: bool = False
    write_menu: bool = False
    write_env: bool = False
    reasons: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.actions)


def _expected_fs(name: str) -> tuple[str, str]:
    """(filesystem type, filesystem label) of a layout partition."""
    if name == slots.NAME_ESP:
        return "vfat", slots.NAME_ESP
    return "ext4", name


def grub_efi_image() -> bytes:
    """Build the GRUB EFI binary (deterministic for a given GRUB build)."""
    if not shutil.which("grub-mkimage"):
        raise LayoutError("grub-mkimage is missing: install grub-common and grub-efi-amd64-bin")
    with tempfile.TemporaryDirectory(prefix="kubeos-grub-") as tmp:
        out = os.path.join(tmp, "BOOTX64.EFI")
        blockdev.run(["grub-mkimage", "-O", "x86_64-efi", "-p", "/EFI/BOOT", "-o", out, *grubcfg.EFI_MODULES])
        with open(out, "rb") as handle:
            return handle.read()


def _need(table: blockdev.PartitionTable, name: str) -> blockdev.Partition:
    part = table.by_name(name)
    if part is None:
        raise LayoutError(f"partition {name} is missing on {table.disk}; lay the disk out again (force: true)")
    return part


def _menu(spec: LayoutSpec, table: blockdev.PartitionTable) -> str:
    entries = []
    for slot, name in slots.SLOT_NAMES.items():
        part = _need(table, name)
        entries.append(grubcfg.SlotEntry(slot, part.number, part.partuuid))
    return grubcfg.render_menu(
        entries, kernel_args=spec.kernel_args, timeout=spec.grub_timeout, panic=spec.panic_timeout
    )


def _esp_config(table: blockdev.PartitionTable) -> str:
    boot = table.by_name(slots.NAME_BOOT)
    if boot is None or not boot.fsuuid:
        raise LayoutError(f"BOOT on {table.disk} has no filesystem yet")
    return grubcfg.render_esp(boot.fsuuid, boot.label or slots.NAME_BOOT)


def initial_env() -> dict[str, str]:
    return {"kubeos_default": "A", "kubeos_A_bootable": "no", "kubeos_B_bootable": "no"}


def _table_matches(spec: LayoutSpec, table: blockdev.PartitionTable) -> list[str]:
    """Differences between the disk's partition table and the wanted one (empty when it matches)."""
    wanted = spec.partitions()
    have = table.partitions
    if table.label != "gpt":
        return [f"partition table is {table.label or 'missing'}, not gpt"]
    if [p.partlabel for p in have] != [w.name for w in wanted]:
        return [f"partitions are {[p.partlabel for p in have]}, wanted {[w.name for w in wanted]}"]
    diffs = []
    for part, want in zip(have, wanted):
        if part.type_guid != want.type_guid:
            diffs.append(f"{want.name} has type {part.type_guid}, wanted {want.type_guid}")
        if want.size is not None and part.size != want.size:
            diffs.append(f"{want.name} is {part.size // MIB} MiB, wanted {want.size // MIB} MiB")
    return diffs


def is_kubeos_table(table: blockdev.PartitionTable) -> bool:
    names = [p.partlabel for p in table.partitions if p.partlabel != slots.NAME_BIOS]
    return names == [
        slots.NAME_ESP,
        slots.NAME_BOOT,
        slots.SLOT_NAMES["A"],
        slots.SLOT_NAMES["B"],
        slots.NAME_PERSIST,
    ]


def read_menu(boot: blockdev.Partition) -> str | None:
    with blockdev.mounted(boot.node, readonly=True) as root:
        path = os.path.join(root, grubcfg.BOOT_CONFIG_PATH)
        if not os.path.isfile(path):
            return None
        with open(path, encoding="utf-8") as handle:
            return handle.read()


def read_env_file(boot: blockdev.Partition) -> dict[str, str] | None:
    with blockdev.mounted(boot.node, readonly=True) as root:
        path = os.path.join(root, grubcfg.BOOT_ENV_PATH)
        if not os.path.isfile(path):
            return None
        try:
            return grubenv.read(path)
        except grubenv.GrubEnvError:
            return None


def plan(spec: LayoutSpec, table: blockdev.PartitionTable, *, force: bool, efi_image: bytes) -> Plan:
    """Compare the disk with ``spec``; decide what to do. Raises LayoutError when the disk holds other data."""
    spec.validate(table.size)
    result = Plan()
    in_use = blockdev.disk_in_use(table)
    if in_use:
        raise LayoutError(
            f"{table.disk} is in use ({'; '.join(in_use)}); unmount it first. kubeos never lays out a disk in use"
        )
    diffs = _table_matches(spec, table)
    if diffs:
        if table.partitions or blockdev.disk_signatures(table.disk):
            what = (
                "a kubeos layout of other sizes"
                if is_kubeos_table(table)
                else "partitions or filesystems that are not the kubeos layout"
            )
            detail = "; ".join(diffs)
            if not force:
                raise LayoutError(
                    f"{table.disk} already holds {what} ({detail}). Nothing was changed. "
                    "Set force: true to erase the whole disk and lay it out anew (all data on it is lost)."
                )
            result.reasons.append(f"force: erasing {table.disk} ({detail})")
        result.repartition = True
        result.actions.append(f"partition {table.disk} as GPT: " + ", ".join(p.name for p in spec.partitions()))
        result.format_parts = [p.name for p in spec.partitions() if p.name != slots.NAME_BIOS]
    else:
        for part in table.partitions:
            if part.partlabel == slots.NAME_BIOS:
                continue
            fstype, label = _expected_fs(part.partlabel)
            # Slots may hold any filesystem an image brought; only an empty slot is formatted.
            if part.partlabel in slots.SLOT_NAMES.values():
                if not part.fstype:
                    result.format_parts.append(part.partlabel)
                continue
            if part.fstype != fstype or part.label != label:
                if part.fstype and not force:
                    raise LayoutError(
                        f"{part.node} ({part.partlabel}) holds {part.fstype} labelled {part.label!r}, not {fstype} "
                        f"labelled {label!r}. Nothing was changed. Set force: true to re-create it."
                    )
                result.format_parts.append(part.partlabel)
    for name in result.format_parts:
        result.actions.append(f"create {_expected_fs(name)[0]} on {name}")
    if result.repartition or slots.NAME_ESP in result.format_parts:
        result.write_esp = True
    if result.repartition or slots.NAME_BOOT in result.format_parts:
        result.write_menu = result.write_env = True
    if not (result.write_esp and result.write_menu):
        esp = _need(table, slots.NAME_ESP)
        boot = _need(table, slots.NAME_BOOT)
        if not result.write_esp:
            have_efi = blockdev.vfat_read(esp.node, grubcfg.ESP_LOADER_PATH)
            have_cfg = blockdev.vfat_read(esp.node, grubcfg.ESP_CONFIG_PATH)
            if have_efi != efi_image or have_cfg != _esp_config(table).encode():
                result.write_esp = True
        if not result.write_menu:
            if read_menu(boot) != _menu(spec, table):
                result.write_menu = True
            env = read_env_file(boot)
            if env is None:
                result.write_env = True
    if spec.bios_boot:
        boot_part = table.by_name(slots.NAME_BOOT)
        bios_part = table.by_name(slots.NAME_BIOS)
        if result.repartition or slots.NAME_BOOT in result.format_parts or boot_part is None or bios_part is None:
            result.write_bios = True
        else:
            result.write_bios = not biosboot.installed(table.disk, bios_part, biosboot.core_image(boot_part.fsuuid))
    if result.write_bios:
        result.actions.append("install GRUB for BIOS (boot code in the MBR, core image in BIOS)")
    if result.write_esp and not result.repartition:
        result.actions.append("install GRUB EFI loader and hand-over config on ESP")
    if result.write_menu and not result.repartition:
        result.actions.append("write grub/grub.cfg on BOOT")
    if result.write_env and not result.repartition:
        result.actions.append("write a fresh grub/grubenv on BOOT (kubeos_default=A)")
    return result


def _mkfs(part: blockdev.Partition, name: str, populate: str | None = None) -> None:
    fstype, label = _expected_fs(name)
    if fstype == "vfat":
        blockdev.run(["mkfs.vfat", "-n", label, part.node])
        return
    argv = ["mkfs.ext4", "-q", "-F", "-L", label, "-O", EXT4_FEATURES]
    if populate:
        argv += ["-d", populate]
    blockdev.run([*argv, part.node])


def apply(spec: LayoutSpec, disk: str, steps: Plan, *, efi_image: bytes) -> blockdev.PartitionTable:
    """Carry out ``steps`` on ``disk``; return the resulting table."""
    if steps.repartition:
        blockdev.run(["wipefs", "--all", "--force", disk])
        blockdev.run(
            ["sfdisk", "--quiet", "--wipe", "always", "--wipe-partitions", "always", disk],
            input=spec.sfdisk_script().encode(),
        )
        blockdev.settle()
    table = blockdev.read_table(disk)
    for name in steps.format_parts:
        part = _need(table, name)
        if name == slots.NAME_BOOT:
            continue  # made below, populated in one go
        blockdev.run(["wipefs", "--all", "--force", part.node])
        if name == slots.NAME_PERSIST:
            with tempfile.TemporaryDirectory(prefix="kubeos-persist-") as staging:
                for directory in PERSIST_DIRS:
                    os.makedirs(os.path.join(staging, directory), mode=0o755)
                os.chmod(os.path.join(staging, "kubeos"), 0o700)
                _mkfs(part, name, populate=staging)
        else:
            _mkfs(part, name)
    boot = _need(table, slots.NAME_BOOT)
    if slots.NAME_BOOT in steps.format_parts:
        with tempfile.TemporaryDirectory(prefix="kubeos-boot-") as staging:
            os.makedirs(os.path.join(staging, "grub"))
            with open(os.path.join(staging, grubcfg.BOOT_CONFIG_PATH), "w", encoding="utf-8") as handle:
                handle.write(_menu(spec, table))
            with open(os.path.join(staging, grubcfg.BOOT_ENV_PATH), "wb") as handle:
                handle.write(grubenv.encode(initial_env()))
            blockdev.run(["wipefs", "--all", "--force", boot.node])
            _mkfs(boot, slots.NAME_BOOT, populate=staging)
    elif steps.write_menu or steps.write_env:
        with blockdev.mounted(boot.node, readonly=False) as root:
            os.makedirs(os.path.join(root, "grub"), exist_ok=True)
            if steps.write_menu:
                atomicfile.replace(os.path.join(root, grubcfg.BOOT_CONFIG_PATH), _menu(spec, table).encode())
            if steps.write_env:
                grubenv.write_atomic(os.path.join(root, grubcfg.BOOT_ENV_PATH), initial_env())
    table = blockdev.read_table(disk)
    if steps.write_esp:
        esp = _need(table, slots.NAME_ESP)
        blockdev.vfat_write(esp.node, grubcfg.ESP_LOADER_PATH, efi_image)
        blockdev.vfat_write(esp.node, grubcfg.ESP_CONFIG_PATH, _esp_config(table).encode())
    if steps.write_bios:
        boot_fs = _need(table, slots.NAME_BOOT)
        biosboot.install(disk, _need(table, slots.NAME_BIOS), biosboot.core_image(boot_fs.fsuuid))
    blockdev.run(["sync"])
    return table


def diff_text(before: blockdev.PartitionTable, after: blockdev.PartitionTable | None, steps: Plan) -> dict[str, str]:
    """A readable before/after of the disk for Ansible's --diff."""

    def describe(table: blockdev.PartitionTable) -> str:
        lines = [f"{table.disk}: {table.label or 'no partition table'}, {table.size // MIB} MiB"]
        for p in table.partitions:
            lines.append(
                f"  {p.number}: {p.partlabel or '-'} {p.size // MIB} MiB {p.fstype or 'no filesystem'} {p.label}"
            )
        return "\n".join(lines) + "\n"

    after_text = describe(after) if after is not None else "".join(f"  will {a}\n" for a in steps.actions)
    return {"before": describe(before), "after": after_text}
