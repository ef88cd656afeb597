#!/usr/bin/python
# Copyright: kubeos contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: image_payload
short_description: Turn a root filesystem into a kubeos upgrade payload (ext4 image, sha256, manifest)
version_added: "0.1.0"
description:
  - Builds C(<dest>/<name>.ext4), a raw ext4 filesystem image of O(rootfs) (a directory or a tar archive), with
    C(mkfs.ext4 -d) (ownership, modes, xattrs, hard links, symlinks and device nodes are kept), next to it
    C(<name>.ext4.sha256) and C(<name>.json), a manifest with the version, format, size and sha256 that
    M(kubeos.os.slot_write) consumes.
  - Refuses a root filesystem without an os-release or without a kernel at C(/boot/vmlinuz).
  - Building again from an unchanged root filesystem changes nothing (the manifest keeps a fingerprint of the
    source - the sha256 of a tar, or names, modes, owners, sizes and times of a directory tree).
author:
  - kubeos contributors (@kubeos)
requirements:
  - mkfs.ext4 (e2fsprogs), GNU tar
options:
  rootfs:
    description: The root filesystem, as a directory or a tar archive (plain or compressed).
    type: path
    required: true
  dest:
    description: Directory that receives the payload files.
    type: path
    required: true
  name:
    description: Base name of the payload files.
    type: str
    required: true
  version:
    description: The OS version to record. Default is VERSION_ID (or VERSION) from the root filesystem's os-release.
    type: str
  size:
    description: Size of the filesystem image (V(1GiB)). Default is the content plus a third and 48 MiB.
    type: str
  label:
    description: Filesystem label inside the image (M(kubeos.os.slot_write) relabels it to the slot's label).
    type: str
    default: kubeos-root
  force:
    description: Rebuild even when the source did not change.
    type: bool
    default: false
notes:
  - Supports check mode.
seealso:
  - module: kubeos.os.slot_write
"""

EXAMPLES = r"""
- name: Build the v2 upgrade payload
  kubeos.os.image_payload:
    rootfs: /var/tmp/rootfs-v2.tar
    dest: /srv/kubeos/images
    name: kubeos-v2
  register: payload

- name: Write it into the inactive slot of a node
  kubeos.os.slot_write:
    src: "file://{{ payload.image }}"
    sha256: "{{ payload.manifest.sha256 }}"
"""

RETURN = r"""
image:
  description: Path of the ext4 image.
  returned: success
  type: str
manifest_path:
  description: Path of the JSON manifest.
  returned: success
  type: str
manifest:
  description: The manifest (name, version, format, file, size, sha256, os_release, source, source_fingerprint).
  returned: success, unless check mode would build
  type: dict
"""

import os

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.kubeos.os.plugins.module_utils import blockdev, layout, payload


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(
            rootfs=dict(type="path", required=True),
            dest=dict(type="path", required=True),
            name=dict(type="str", required=True),
            version=dict(type="str"),
            size=dict(type="str"),
            label=dict(type="str", default="kubeos-root"),
            force=dict(type="bool", default=False),
        ),
        supports_check_mode=True,
    )
    params = module.params
    try:
        size = layout.parse_size(params["size"], "size") if params["size"] else None
        changed, manifest, manifest_path = payload.build(
            params["rootfs"],
            params["dest"],
            name=params["name"],
            version=params["version"],
            size=size,
            label=params["label"],
            force=params["force"],
            check_mode=module.check_mode,
        )
    except (payload.PayloadError, layout.LayoutError) as exc:
        module.fail_json(msg=str(exc))
    except blockdev.CommandError as exc:
        module.fail_json(msg=str(exc), rc=exc.rc, stdout=exc.out, stderr=exc.err, cmd=exc.argv)
    module.exit_json(
        changed=changed,
        image=os.path.join(params["dest"], f"{params['name']}.ext4"),
        manifest_path=manifest_path,
        manifest=manifest.to_dict() if manifest else None,
    )


if __name__ == "__main__":
    main()
