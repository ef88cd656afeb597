# Copyright: kubeos contributors
# Apache License 2.0 (see LICENSE)
"""GRUB for legacy BIOS: boot.img in the MBR, core.img in the BIOS boot partition.

``grub-bios-setup`` wants to probe the host's own root device and fails on loop devices and in
containers, so the two images are put in place here, the way it does it: the core image's first
sector (diskboot) learns where the rest of the core image is, the MBR's boot code learns where the
core image starts, and the MBR keeps its partition area (the protective GPT entry) and disk
signature. The core image carries a small config that finds BOOT by filesystem UUID and loads the
same A/B menu as the EFI loader; its output also goes to the first serial port.
"""

from __future__ import annotations

__metaclass__ = type

import os
import struct
import tempfile

from ansible_collections.kubeos.os.plugins.module_utils import blockdev, grubcfg

I386_PC_DIR = "/usr/lib/grub/i386-pc"
SECTOR = 512
# Offsets in GRUB's boot.img (include/grub/i386/pc/boot.h).
BPB_START, BPB_END = 0x03, 0x5A
KERNEL_SECTOR = 0x5C
DRIVE_CHECK = 0x66
PART_AREA = 0x1B8  # disk signature, partition table, 0x55AA: kept from the disk
# The blocklist at the end of core.img's first sector (diskboot.S): start (u64), length (u16), segment (u16).
BLOCKLIST = SECTOR - 12

_EFI_ONLY = ("efi_gop", "all_video")
BIOS_MODULES = (*(m for m in grubcfg.EFI_MODULES if m not in _EFI_ONLY), "biosdisk", "serial", "terminal")

EARLY_CONFIG = """\
serial --unit=0 --speed=115200
terminal_output --append serial
search --no-floppy --fs-uuid --set=root {boot_fsuuid}
set prefix=($root)/grub
configfile ($root)/grub/grub.cfg
"""


class BiosBootError(Exception):
    """GRUB for BIOS cannot be installed."""


def core_image(boot_fsuuid: str) -> bytes:
    """Build core.img (modules built in, early config finding BOOT by filesystem UUID)."""
    if not os.path.isdir(I386_PC_DIR):
        raise BiosBootError(
            f"GRUB's i386-pc platform ({I386_PC_DIR}) is missing: install grub-pc-bin to lay out a disk with bios_boot"
        )
    with tempfile.TemporaryDirectory(prefix="kubeos-grub-bios-") as tmp:
        config = os.path.join(tmp, "early.cfg")
        with open(config, "w", encoding="utf-8") as handle:
            handle.write(EARLY_CONFIG.format(boot_fsuuid=boot_fsuuid))
        out = os.path.join(tmp, "core.img")
        blockdev.run(
            ["grub-mkimage", "-O", "i386-pc", "-d", I386_PC_DIR, "-c", config, "-p", "/grub", "-o", out, *BIOS_MODULES]
        )
        with open(out, "rb") as handle:
            return handle.read()


def boot_image() -> bytes:
    with open(os.path.join(I386_PC_DIR, "boot.img"), "rb") as handle:
        data = handle.read()
    if len(data) != SECTOR:
        raise BiosBootError(f"{I386_PC_DIR}/boot.img is {len(data)} bytes, not one sector")
    return data


def placed_core(core: bytes, partition_start: int) -> bytes:
    """core.img with its blocklist pointing at the sectors after its first one, in the BIOS partition."""
    start_lba = partition_start // SECTOR
    sectors = -(-len(core) // SECTOR)
    patched = bytearray(core)
    struct.pack_into("<QH", patched, BLOCKLIST, start_lba + 1, sectors - 1)
    return bytes(patched) + b"\0" * (sectors * SECTOR - len(core))


def placed_mbr(boot: bytes, current_mbr: bytes, partition_start: int) -> bytes:
    """The MBR: GRUB's boot code pointing at core.img, the disk's own BPB area and partition area kept."""
    mbr = bytearray(boot)
    mbr[BPB_START:BPB_END] = current_mbr[BPB_START:BPB_END]
    struct.pack_into("<Q", mbr, KERNEL_SECTOR, partition_start // SECTOR)
    mbr[DRIVE_CHECK : DRIVE_CHECK + 2] = b"\x90\x90"  # a hard disk: do not insist on drive 0x80
    mbr[PART_AREA:] = current_mbr[PART_AREA:]
    return bytes(mbr)


def _read(path: str, offset: int, size: int) -> bytes:
    with open(path, "rb") as handle:
        handle.seek(offset)
        return handle.read(size)


def installed(disk: str, bios: blockdev.Partition, core: bytes) -> bool:
    """Is this exact GRUB for BIOS in place?"""
    core_sectors = placed_core(core, bios.start)
    if len(core_sectors) > bios.size:
        return False
    mbr = _read(disk, 0, SECTOR)
    return _read(bios.node, 0, len(core_sectors)) == core_sectors and mbr == placed_mbr(boot_image(), mbr, bios.start)


def install(disk: str, bios: blockdev.Partition, core: bytes) -> None:
    """Write core.img into the BIOS boot partition, then GRUB's boot code into the MBR (both fsynced)."""
    core_sectors = placed_core(core, bios.start)
    if len(core_sectors) > bios.size:
        raise BiosBootError(f"GRUB's core image ({len(core_sectors)} bytes) does not fit the BIOS boot partition")
    _write(bios.node, 0, core_sectors)
    mbr = _read(disk, 0, SECTOR)
    _write(disk, 0, placed_mbr(boot_image(), mbr, bios.start))


def _write(path: str, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)
