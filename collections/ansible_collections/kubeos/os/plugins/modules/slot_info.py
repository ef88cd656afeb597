#!/usr/bin/python
# Copyright: kubeos contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: slot_info
short_description: Facts about the A/B slots and the GRUB state of a kubeos disk
version_added: "0.1.0"
description:
  - Reads the layout of the running system's disk, or of O(device), and returns it as the fact C(kubeos).
  - Recognises the kubeos layout (C(ESP | BOOT | ROOT-A | ROOT-B | PERSIST)) and disks laid out by openEuler
    KubeOS's own image builder (vfat BOOT, ROOT-A, ROOT-B, PERSIST), reported as layout C(kubeos-legacy).
  - The active slot is the one holding the running root, matched by PARTUUID, filesystem label, filesystem
    UUID or device number against C(root=) on the kernel command line (or the device mounted at C(/), or
    O(running_root)); never guessed from device names. On a disk that is not running (an image file), the
    active slot is the committed one (C(kubeos_default)) and C(running_slot) is null.
  - Each slot is mounted read-only on a private directory to read its os-release and look for its kernel;
    a slot that is already mounted is read where it is.
author:
  - kubeos contributors (@kubeos)
requirements:
  - sfdisk, blkid, losetup, mount (util-linux / fdisk), mtools for KubeOS-built disks
options:
  device:
    description:
      - The disk or disk image file to inspect. Default is the disk holding the running root.
    type: path
  running_root:
    description:
      - The running root, as on the kernel command line (V(PARTUUID=…), V(LABEL=ROOT-B), V(UUID=…)) or a
        device path. Default is C(root=) from C(/proc/cmdline), else the device mounted at C(/).
      - Used by tests and by image builds to state which slot counts as running.
    type: str
notes:
  - Supports check mode; changes nothing.
seealso:
  - module: kubeos.os.disk_layout
  - module: kubeos.os.boot_slot
"""

EXAMPLES = r"""
- name: Read the slots of this node
  kubeos.os.slot_info:

- name: Inspect a disk image as if slot B were running
  kubeos.os.slot_info:
    device: /var/tmp/node.img
    running_root: LABEL=ROOT-B

- name: Show which slot an upgrade would write
  ansible.builtin.debug:
    msg: "upgrade goes to slot {{ ansible_facts.kubeos.inactive_slot }}"
"""

RETURN = r"""
ansible_facts:
  description: Facts to add to ansible_facts.
  returned: always
  type: dict
  contains:
    kubeos:
      description: The disk, its slots and its GRUB state.
      returned: always
      type: dict
      contains:
        layout:
          description: V(kubeos) or V(kubeos-legacy) (a disk laid out by KubeOS).
          type: str
        disk:
          description: The block device inspected (a loop device for an image file).
          type: str
        running_root:
          description: The running root specification that was matched.
          type: str
        running_slot:
          description: The slot holding the running root, or null when the system does not run from this disk.
          type: str
        active_slot:
          description: The running slot, or the committed slot of a disk that is not running.
          type: str
        active_source:
          description: V(running-root) or V(committed), telling where active_slot came from.
          type: str
        inactive_slot:
          description: The other slot, where an upgrade is written.
          type: str
        slots:
          description:
            - For V(A) and V(B) - device, partuuid, partlabel, label, fstype, size, version (VERSION_ID),
              pretty_name, os_release, has_kernel, has_initrd, marked_bootable (GRUB env) and bootable
              (marked bootable and holding a kernel and an os-release).
          type: dict
        grub:
          description: default, trial, tries, trial_failed, marked_bootable and the whole env.
          type: dict
        boot:
          description: The BOOT partition.
          type: dict
        esp:
          description: The EFI system partition (null on KubeOS-built disks).
          type: dict
        persist:
          description: The PERSIST partition.
          type: dict
        bios_boot:
          description: Whether the disk has a BIOS boot partition.
          type: bool
  sample:
    kubeos:
      layout: kubeos
      active_slot: A
      inactive_slot: B
      slots:
        A: {device: /dev/vda3, partuuid: 3f0c…, label: ROOT-A, version: "2", bootable: true}
        B: {device: /dev/vda4, partuuid: 9a1d…, label: ROOT-B, version: "", bootable: false}
      grub: {default: A, trial: null, tries: null}
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.kubeos.os.plugins.module_utils import blockdev, grubenv, slots


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(
            device=dict(type="path"),
            running_root=dict(type="str"),
        ),
        supports_check_mode=True,
    )
    try:
        with slots.open_disk(module.params["device"], module.params["running_root"], writable=False) as disk:
            facts = slots.read_state(disk, module.params["running_root"]).to_dict()
    except (slots.LayoutError, blockdev.DeviceError, grubenv.GrubEnvError) as exc:
        module.fail_json(msg=str(exc))
    except blockdev.CommandError as exc:
        module.fail_json(msg=str(exc), rc=exc.rc, stdout=exc.out, stderr=exc.err, cmd=exc.argv)
    module.exit_json(changed=False, kubeos=facts, ansible_facts={"kubeos": facts})


if __name__ == "__main__":
    main()
