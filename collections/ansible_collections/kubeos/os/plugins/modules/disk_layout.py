#!/usr/bin/python
# Copyright: kubeos contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: disk_layout
short_description: Create or verify the kubeos A/B disk layout
version_added: "0.1.0"
description:
  - Lays out a disk (or a disk image file) as C(ESP | BOOT | ROOT-A | ROOT-B | PERSIST) on GPT, with partition
    names and filesystem labels of the same names.
  - The ESP (vfat) gets a GRUB EFI binary built with C(grub-mkimage) at C(EFI/BOOT/BOOTX64.EFI) and a small
    config that finds BOOT by its filesystem UUID and hands over to it. It is written with mtools, so the
    host never has to mount vfat.
  - BOOT (ext4) gets C(grub/grub.cfg), the A/B menu with the trial-boot try counter, rendered from a Jinja2
    template with both slots addressed by PARTUUID, and a fresh C(grub/grubenv) with C(kubeos_default=A) and
    both slots marked not bootable (they are empty).
  - ROOT-A and ROOT-B get empty ext4 filesystems; PERSIST gets ext4 and takes the rest of the disk unless
    O(persist_size) is given.
  - A disk that already has this layout is left alone (C(changed=false)); a missing or outdated GRUB file is
    rewritten without touching the slots or PERSIST. A disk holding anything else is refused unless
    O(force=true).
  - An image file gets its own loop device, attached and detached by the module.
author:
  - kubeos contributors (@kubeos)
requirements:
  - sfdisk, wipefs, blkid, losetup (util-linux / fdisk)
  - mkfs.ext4 (e2fsprogs), mkfs.vfat (dosfstools), mtools
  - grub-mkimage with the x86_64-efi platform (grub-common, grub-efi-amd64-bin)
  - the Python library jinja2 on the target host
options:
  device:
    description:
      - The whole disk (for example V(/dev/sdb)) or a disk image file to lay out.
    type: path
    required: true
  force:
    description:
      - Erase a disk that holds partitions or filesystems that are not this layout (or this layout with other
        sizes), and re-create filesystems of the wrong type. All data on the disk is lost.
    type: bool
    default: false
  esp_size:
    description: Size of the EFI system partition, in MiB units such as V(64MiB).
    type: str
    default: 64MiB
  boot_size:
    description: Size of the BOOT partition.
    type: str
    default: 64MiB
  root_size:
    description: Size of each of the two root slots ROOT-A and ROOT-B.
    type: str
    default: 2GiB
  persist_size:
    description: Size of PERSIST. When not given, PERSIST takes the rest of the disk.
    type: str
  bios_boot:
    description:
      - Put a 1 MiB BIOS boot partition (named V(BIOS)) in front of the ESP and install GRUB for legacy BIOS -
        its boot code in the MBR, its core image (which loads the same A/B menu from BOOT) in that partition.
      - Needs GRUB's i386-pc platform on the host (Debian package grub-pc-bin).
    type: bool
    default: false
  kernel_args:
    description:
      - Kernel arguments added to both slots' command lines in C(grub.cfg), for example V(console=ttyS0).
      - Per-slot arguments live in the GRUB environment instead (see M(kubeos.os.boot_slot)).
    type: str
    default: ""
  grub_timeout:
    description: Seconds the GRUB menu waits before it boots the chosen slot.
    type: int
    default: 0
  panic_timeout:
    description:
      - Seconds after a kernel panic before the machine reboots (C(panic=N)); the reboot burns a trial try.
    type: int
    default: 10
notes:
  - Supports check mode (reports what would be done) and diff mode (the partition table before and after).
  - Refuses a disk that has a mounted partition, an active swap or holders (LVM, RAID).
seealso:
  - module: kubeos.os.slot_info
  - module: kubeos.os.boot_slot
  - module: kubeos.os.slot_write
"""

EXAMPLES = r"""
- name: Lay out a disk image for a kubeos node (4 GiB file, 1 GiB slots)
  kubeos.os.disk_layout:
    device: /var/tmp/node.img
    root_size: 1GiB
    kernel_args: console=ttyS0

- name: Re-create the layout on a disk that holds something else (erases it)
  kubeos.os.disk_layout:
    device: /dev/vdb
    force: true
"""

RETURN = r"""
device:
  description: The block device that was laid out (a loop device for an image file, detached again).
  returned: always
  type: str
actions:
  description: What was done (or, in check mode, what would be done), in order.
  returned: always
  type: list
  elements: str
  sample: ["partition /dev/loop3 as GPT: ESP, BOOT, ROOT-A, ROOT-B, PERSIST", "create ext4 on BOOT"]
partitions:
  description: The partitions after the run (before, in check mode).
  returned: always
  type: list
  elements: dict
  sample: [{"number": 1, "partlabel": "ESP", "fstype": "vfat", "label": "ESP", "partuuid": "…", "size": 67108864}]
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.kubeos.os.plugins.module_utils import biosboot, blockdev, grubcfg, grubenv, layout


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(
            device=dict(type="path", required=True),
            force=dict(type="bool", default=False),
            esp_size=dict(type="str", default="64MiB"),
            boot_size=dict(type="str", default="64MiB"),
            root_size=dict(type="str", default="2GiB"),
            persist_size=dict(type="str"),
            bios_boot=dict(type="bool", default=False),
            kernel_args=dict(type="str", default=""),
            grub_timeout=dict(type="int", default=0),
            panic_timeout=dict(type="int", default=10),
        ),
        supports_check_mode=True,
    )
    params = module.params
    try:
        spec = layout.LayoutSpec(
            esp_size=layout.parse_size(params["esp_size"], "esp_size"),
            boot_size=layout.parse_size(params["boot_size"], "boot_size"),
            root_size=layout.parse_size(params["root_size"], "root_size"),
            persist_size=(
                layout.parse_size(params["persist_size"], "persist_size") if params["persist_size"] else None
            ),
            bios_boot=params["bios_boot"],
            kernel_args=params["kernel_args"],
            grub_timeout=params["grub_timeout"],
            panic_timeout=params["panic_timeout"],
        )
        efi_image = layout.grub_efi_image()
        with blockdev.attached(params["device"]) as disk:
            before = blockdev.read_table(disk)
            steps = layout.plan(spec, before, force=params["force"], efi_image=efi_image)
            after = None
            if steps.changed and not module.check_mode:
                after = layout.apply(spec, disk, steps, efi_image=efi_image)
            result = dict(
                changed=steps.changed,
                device=disk,
                actions=steps.actions,
                warnings_=steps.reasons,
                partitions=[p.to_dict() for p in (after or before).partitions],
            )
            if module._diff and steps.changed:
                result["diff"] = layout.diff_text(before, after, steps)
    except (
        layout.LayoutError,
        biosboot.BiosBootError,
        blockdev.DeviceError,
        grubenv.GrubEnvError,
        grubcfg.TemplateError,
    ) as exc:
        module.fail_json(msg=str(exc))
    except blockdev.CommandError as exc:
        module.fail_json(msg=str(exc), rc=exc.rc, stdout=exc.out, stderr=exc.err, cmd=exc.argv)
    for reason in result.pop("warnings_"):
        module.warn(reason)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
