#!/usr/bin/python
# Copyright: kubeos contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: boot_slot
short_description: Arm a trial boot, commit a slot, or roll back, in the GRUB environment of a kubeos disk
version_added: "0.1.0"
description:
  - V(trial) makes GRUB boot O(slot) (default the inactive slot) at the next O(tries) boots while the committed
    slot stays the default. GRUB counts each try down before the kernel starts; when the tries are used up, the
    trial is cleared and the committed slot boots again by itself. A new trial clears C(kubeos_trial_failed).
  - V(committed) makes O(slot) (default the running slot; on a disk that is not running, the trial slot) the
    default and clears any trial. Refuses to commit a slot other than the running one; use V(rollback) for that.
  - V(rollback) makes the other slot (or O(slot)) the default and clears any trial; it boots at the next restart.
  - Every state refuses a slot that is marked not bootable, or that holds no kernel (C(/boot/vmlinuz)) or no
    os-release.
  - The GRUB environment block is written atomically (new file, fsync, rename, fsync of the directory) and
    stays byte-compatible with C(grub-editenv). Nothing is written when nothing changes.
  - On a disk laid out by KubeOS (layout C(kubeos-legacy)) only V(committed) and V(rollback) are possible; they
    set C(saved_entry).
author:
  - kubeos contributors (@kubeos)
requirements:
  - sfdisk, blkid, losetup, mount (util-linux / fdisk)
options:
  device:
    description: The disk or disk image file. Default is the disk holding the running root.
    type: path
  running_root:
    description: The running root, as for M(kubeos.os.slot_info). Default is C(root=) from C(/proc/cmdline).
    type: str
  state:
    description: What the next boots should do.
    type: str
    required: true
    choices: [trial, committed, rollback]
  slot:
    description: The slot to try, commit or roll back to. Defaults depend on O(state) (see above).
    type: str
    choices: [A, B]
  tries:
    description: How many boots the trial slot gets before GRUB falls back (1 to 9).
    type: int
    default: 3
notes:
  - Supports check mode and diff mode (the GRUB environment before and after, as C(grub-editenv list) shows it).
seealso:
  - module: kubeos.os.slot_info
  - module: kubeos.os.slot_write
"""

EXAMPLES = r"""
- name: Boot the freshly written slot on trial, three tries
  kubeos.os.boot_slot:
    state: trial

- name: After a healthy boot, commit the running slot
  kubeos.os.boot_slot:
    state: committed

- name: Go back to the other slot at the next restart
  kubeos.os.boot_slot:
    state: rollback

- name: Commit slot B of an image that is not running
  kubeos.os.boot_slot:
    device: /var/tmp/node.img
    state: committed
    slot: B
"""

RETURN = r"""
slot:
  description: The slot the change was about.
  returned: success
  type: str
  sample: B
message:
  description: What the change means for the next boots.
  returned: success
  type: str
  sample: slot B will boot on trial up to 3 times; slot A stays committed
grub:
  description: The GRUB state after the change (default, trial, tries, trial_failed, marked_bootable, env).
  returned: success
  type: dict
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.kubeos.os.plugins.module_utils import blockdev, bootcontrol, grubenv, slots


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(
            device=dict(type="path"),
            running_root=dict(type="str"),
            state=dict(type="str", required=True, choices=list(bootcontrol.STATES)),
            slot=dict(type="str", choices=list(slots.SLOTS)),
            tries=dict(type="int", default=3),
        ),
        supports_check_mode=True,
    )
    params = module.params
    try:
        with slots.open_disk(params["device"], params["running_root"]) as disk:
            state = slots.read_state(disk, params["running_root"])
            change = bootcontrol.plan(state, params["state"], params["slot"], params["tries"])
            env = slots.BootEnv(state.layout)
            before = state.grub.env
            after = grubenv.update(before, change.set_vars)
            grubenv.encode(after)  # refuse a change that would not fit before writing anything
            changed = after != before
            if changed and not module.check_mode:
                env.write(after)
    except (slots.LayoutError, slots.SlotError, blockdev.DeviceError, grubenv.GrubEnvError) as exc:
        module.fail_json(msg=str(exc))
    except blockdev.CommandError as exc:
        module.fail_json(msg=str(exc), rc=exc.rc, stdout=exc.out, stderr=exc.err, cmd=exc.argv)
    result = dict(
        changed=changed,
        slot=change.slot,
        message=change.message,
        grub=slots.grub_state(state.layout.kind, after).to_dict(),
    )
    if module._diff and changed:
        result["diff"] = {
            "before_header": "grubenv",
            "after_header": "grubenv",
            "before": grubenv.render_list(before),
            "after": grubenv.render_list(after),
        }
    module.exit_json(**result)


if __name__ == "__main__":
    main()
