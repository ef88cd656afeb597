#!/usr/bin/python
# Copyright: kubeos contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: sysconfig
short_description: Apply KubeOS configuration models (sysctl, kernel arguments, kubelet, containerd, PAM limits)
version_added: "0.1.0"
description:
  - Applies the C(sysconfigs) / C(upgradeconfigs) entries of a KubeOS C(OS) object, unchanged, to a node.
    Each entry names a C(model), an optional C(configpath) and a list of C(contents) C({key, value, operation}).
  - V(kernel.sysctl) sets the running kernel (C(/proc/sys), key C(a.b.c) is C(/proc/sys/a/b/c)); the key must
    exist; it cannot be deleted.
  - V(kernel.sysctl.persist) edits C(key = value) lines of C(/etc/sysctl.conf) (or a file in C(/etc/sysctl.d));
    V(delete) removes the key (with a value, only when the file holds that value).
  - V(grub.cmdline.current) and V(grub.cmdline.next) set extra kernel arguments of the running slot and of the
    other slot. They live in the GRUB environment (C(kubeos_A_cmdline), C(kubeos_B_cmdline)), which C(grub.cfg)
    appends to each slot's kernel line, so C(grub.cfg) is never edited. C(key=value), a bare C(key) (value empty
    or null), V(delete); setting a key replaces its earlier form, so C(key=value) becomes a bare C(key) in one
    step. The GRUB environment block holds 1024 bytes; arguments that would not fit are refused.
  - V(kubernetes.kubelet) sets dotted key paths in the kubelet's YAML (C(/var/lib/kubelet/config.yaml));
    V(container.containerd) in containerd's TOML (C(/etc/containerd/config.toml)). Quote a part that holds dots
    (C(evictionHard."memory.available")). Missing mappings are created; setting a list appends the items it
    does not hold yet; V(delete) removes the key (or, with a list value, those items of a list).
  - V(pam.limits) edits C(/etc/security/limits.conf) - key is the domain, value C(type.item.value)
    (C(soft.nofile.65535)); C(_) keeps what the line has.
  - Everything is checked before anything is written (unknown model, malformed key or key path, value of a wrong
    type, C(configpath) outside the model's places or leading elsewhere through C(..) or a symbolic link, a sysctl
    key the kernel does not have); a failure reports every problem and changes nothing.
  - Files are replaced atomically (temporary file, fsync, rename, fsync of the directory) and keep owner, mode,
    comments, order and formatting of what was not changed. Each file, setting and the GRUB environment is written
    once; if writing one fails, the ones written before are restored.
author:
  - kubeos contributors (@kubeos)
requirements:
  - ruamel.yaml (Python library, only for V(kubernetes.kubelet))
  - tomlkit (Python library, only for V(container.containerd))
  - sfdisk, blkid, losetup, mount (util-linux), only for the V(grub.cmdline.*) models
options:
  configs:
    description:
      - KubeOS's list of configuration entries, applied in order. Entries that name the same target see each
        other's changes.
    type: list
    elements: dict
    required: true
    suboptions:
      model:
        description:
          - One of V(kernel.sysctl), V(kernel.sysctl.persist), V(grub.cmdline.current), V(grub.cmdline.next),
            V(kubernetes.kubelet), V(container.containerd), V(pam.limits).
        type: str
        required: true
      configpath:
        description:
          - The file to edit, for the file models; empty for the default. Allowed - V(kernel.sysctl.persist)
            C(/etc/sysctl.conf) or C(/etc/sysctl.d/*); V(kubernetes.kubelet) below C(/var/lib/kubelet) or
            C(/etc/kubernetes); V(container.containerd) below C(/etc/containerd); V(pam.limits)
            C(/etc/security/limits.conf) or C(/etc/security/limits.d/*). Not used by the other models.
        type: str
        default: ""
      contents:
        description: The settings of this entry, applied in order.
        type: list
        elements: dict
        default: []
        suboptions:
          key:
            description: The sysctl key, kernel argument, key path or PAM domain.
            type: str
            required: true
          value:
            description: The value (any JSON value the model accepts; empty or null for a bare kernel argument).
            type: raw
          operation:
            description: Empty (or V(add), V(update)) to add or update; V(delete) to remove.
            type: str
            default: ""
  root:
    description:
      - A directory treated as C(/) for every file and for C(/proc/sys) (tests, image builds).
    type: path
    default: /
  device:
    description: For the V(grub.cmdline.*) models - the disk or disk image file. Default is the disk holding the running root.
    type: path
  running_root:
    description:
      - For the V(grub.cmdline.*) models - the running root, as for M(kubeos.os.slot_info). Default is C(root=) from
        C(/proc/cmdline). On a disk that is not running, V(grub.cmdline.current) is the committed slot.
    type: str
  reload_sysctl:
    description: After a V(kernel.sysctl.persist) file changed, load it into the running kernel (C(sysctl -p FILE)).
    type: bool
    default: false
  restart_kubelet:
    description: After the kubelet configuration changed, C(systemctl restart kubelet.service).
    type: bool
    default: false
  restart_containerd:
    description: After the containerd configuration changed, C(systemctl restart containerd.service).
    type: bool
    default: false
notes:
  - Supports check mode (everything is computed and checked, nothing written) and diff mode (one diff per changed
    file, sysctl and the GRUB environment).
  - Service actions act on the running system and are refused with a O(root) other than C(/).
seealso:
  - module: kubeos.os.boot_slot
  - module: kubeos.os.slot_info
"""

EXAMPLES = r"""
- name: Apply the sysconfigs of a KubeOS OS object
  kubeos.os.sysconfig:
    configs:
      - model: kernel.sysctl
        contents:
          - {key: net.ipv4.ip_forward, value: 1}
      - model: kernel.sysctl.persist
        configpath: /etc/sysctl.d/90-kubeos.conf
        contents:
          - {key: vm.max_map_count, value: 262144}
          - {key: kernel.pid_max, operation: delete}
      - model: grub.cmdline.next
        contents:
          - {key: systemd.unified_cgroup_hierarchy, value: 1}
          - {key: quiet}
          - {key: debug, operation: delete}
      - model: kubernetes.kubelet
        contents:
          - {key: evictionHard."memory.available", value: 200Mi}
          - {key: clusterDNS, value: [10.96.0.11]}
      - model: container.containerd
        contents:
          - {key: plugins."io.containerd.grpc.v1.cri".sandbox_image, value: "registry.k8s.io/pause:3.9"}
      - model: pam.limits
        contents:
          - {key: "*", value: soft.nofile.65535}
    restart_kubelet: true

- name: Configure an image tree that is not running
  kubeos.os.sysconfig:
    root: /mnt/image
    configs:
      - model: kernel.sysctl.persist
        contents:
          - {key: net.core.somaxconn, value: 4096}
"""

RETURN = r"""
results:
  description:
    - One item per entry - C(index), C(model), C(target) (the file as the node sees it, C(/proc/sys), or the GRUB
      variable), C(slot) for kernel arguments, C(changed), and C(contents) with C(key), C(operation), C(before)
      (the value it replaced, null when absent), C(after), C(changed) and an optional C(note).
  returned: always
  type: list
  elements: dict
  sample:
    - index: 0
      model: grub.cmdline.next
      target: GRUB environment kubeos_B_cmdline
      slot: B
      changed: true
      contents:
        - {key: quiet, operation: set, before: quiet=1, after: quiet, changed: true}
changed_targets:
  description: The files, /proc/sys settings and GRUB environment that were (in check mode - would be) written.
  returned: always
  type: list
  elements: str
actions:
  description: The service actions run (in check mode - that would run).
  returned: always
  type: list
  elements: str
"""

import contextlib
import os

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

from ansible_collections.kubeos.os.plugins.module_utils import blockdev, grubenv, slots
from ansible_collections.kubeos.os.plugins.module_utils.sysconfig import (
    cmdline,
    containerd,
    kubelet,
    models,
    plan,
    services,
    transaction,
)

CONTENT_SPEC = dict(
    key=dict(type="str", required=True, no_log=False),
    value=dict(type="raw"),
    operation=dict(type="str", default=""),
)
ENTRY_SPEC = dict(
    model=dict(type="str", required=True),
    configpath=dict(type="str", default=""),
    contents=dict(type="list", elements="dict", default=[], options=CONTENT_SPEC),
)


def _require_libraries(module: AnsibleModule, entries: list[models.ConfigEntry]) -> None:
    used = {entry.model for entry in entries}
    if models.KUBERNETES_KUBELET in used and not kubelet.HAS_RUAMEL:
        module.fail_json(
            msg=missing_required_lib(kubelet.LIBRARY, reason="for the kubernetes.kubelet model"),
            exception=kubelet.RUAMEL_IMPORT_ERROR,
        )
    if models.CONTAINER_CONTAINERD in used and not containerd.HAS_TOMLKIT:
        module.fail_json(
            msg=missing_required_lib(containerd.LIBRARY, reason="for the container.containerd model"),
            exception=containerd.TOMLKIT_IMPORT_ERROR,
        )


def _run_actions(module: AnsibleModule, actions: list[services.Action]) -> None:
    for action in actions:
        program = module.get_bin_path(action.program, required=True)
        rc, out, err = module.run_command([program, *action.args], environ_update={"LC_ALL": "C"})
        if rc != 0:
            module.fail_json(
                msg=f"the configuration was written, but {action.describe()} failed (exit code {rc}): "
                f"{(err or out).strip() or 'no output'}; fix the service, the files stay as written",
                rc=rc,
                stdout=out,
                stderr=err,
                changed=True,
            )


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(
            configs=dict(type="list", elements="dict", required=True, options=ENTRY_SPEC),
            root=dict(type="path", default="/"),
            device=dict(type="path"),
            running_root=dict(type="str"),
            reload_sysctl=dict(type="bool", default=False),
            restart_kubelet=dict(type="bool", default=False),
            restart_containerd=dict(type="bool", default=False),
        ),
        supports_check_mode=True,
    )
    params = module.params
    flags = {name: params[name] for name in ("reload_sysctl", "restart_kubelet", "restart_containerd")}
    root = params["root"]
    try:
        entries = plan.parse(params["configs"])
        services.check(root, **flags)
        _require_libraries(module, entries)
        if not root or not root.startswith("/") or not os.path.isdir(root):
            raise models.SysconfigError(f"root {root!r} is not an existing directory")
        with contextlib.ExitStack() as stack:
            grub = None
            if plan.needs_grub(entries):
                disk = stack.enter_context(slots.open_disk(params["device"], params["running_root"]))
                state = slots.read_state(disk, params["running_root"], inspect=False)
                grub = cmdline.grub_access(state)
            result = plan.build(entries, root, grub)
            actions = services.actions(result, **flags)
            if result.changed and not module.check_mode:
                transaction.apply_all(result.changes)
    except models.SysconfigError as exc:
        module.fail_json(msg=str(exc))
    except transaction.ApplyError as exc:
        module.fail_json(msg=str(exc), restored=exc.restored, unrestored=exc.unrestored)
    except (slots.LayoutError, slots.SlotError, blockdev.DeviceError, grubenv.GrubEnvError) as exc:
        module.fail_json(msg=str(exc))
    except blockdev.CommandError as exc:
        module.fail_json(msg=str(exc), rc=exc.rc, stdout=exc.out, stderr=exc.err, cmd=exc.argv)
    if not module.check_mode:
        _run_actions(module, actions)
    output = dict(
        changed=result.changed,
        results=[entry.to_dict() for entry in result.entries],
        changed_targets=[change.target for change in result.changes],
        actions=[action.describe() for action in actions],
    )
    if module._diff and result.changed:
        output["diff"] = result.diffs()
    module.exit_json(**output)


if __name__ == "__main__":
    main()
