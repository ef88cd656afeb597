#!/usr/bin/python
# Copyright: kubeos contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: slot_write
short_description: Stream a verified OS image into the inactive slot of a kubeos disk
version_added: "0.1.0"
description:
  - Streams an OS image from O(src) into a root slot, computing its sha256 while writing; no temporary copy is
    made and memory stays bounded whatever the image size.
  - The running slot is never written, and neither is the committed slot the disk falls back to (while another
    slot is on trial, or on a disk that is not running), whatever O(slot) asks for.
  - The source is opened (TLS handshake, client certificate, HTTP status) before anything is written.
  - The slot is marked not bootable in the GRUB environment before the first byte and marked bootable only after
    the sha256 matched; a failed, cancelled or interrupted write leaves it not bootable (after a checksum mismatch
    its filesystem signature is wiped too) and changes nothing else.
  - V(raw) writes a filesystem image block-wise into the partition; V(tar) formats the slot (ext4) and extracts a
    root filesystem archive (plain, gzip, bzip2, xz or zstd) with GNU tar, keeping ownership, modes, xattrs, ACLs,
    hard links, symlinks and device nodes.
  - Writing the image the slot already holds (same sha256, still marked bootable) changes nothing unless
    O(force=true).
author:
  - kubeos contributors (@kubeos)
requirements:
  - util-linux, e2fsprogs, GNU tar (for O(format=tar))
options:
  device:
    description: The disk or disk image file. Default is the disk holding the running root.
    type: path
  running_root:
    description: The running root, as for M(kubeos.os.slot_info). Default is C(root=) from C(/proc/cmdline).
    type: str
  slot:
    description: The slot to write. Default is the inactive slot. The active slot is refused.
    type: str
    choices: [A, B]
  src:
    description:
      - Where the image is. V(file:///path), V(https://…), or V(http://…) only with O(allow_insecure_http=true).
    type: str
    required: true
  sha256:
    description: The expected sha256 of the image (64 hex digits, optionally prefixed with V(sha256:)).
    type: str
    required: true
  format:
    description: V(raw) for a filesystem image, V(tar) for a root filesystem archive.
    type: str
    choices: [raw, tar]
    default: raw
  ca_cert:
    description: PEM file of the certificate authority to trust for V(https://) instead of the system's.
    type: path
  client_cert:
    description: PEM client certificate for mutual TLS.
    type: path
  client_key:
    description: PEM private key of O(client_cert) (when not in the same file).
    type: path
  allow_insecure_http:
    description: Allow plain V(http://) sources (KubeOS's C(flagSafe)). The sha256 still has to match.
    type: bool
    default: false
  timeout:
    description: Seconds to wait for the server to connect or send data.
    type: float
    default: 60
  force:
    description: Write even when the slot already holds this image.
    type: bool
    default: false
  progress_file:
    description:
      - A file that receives the progress as JSON (C(phase), C(bytes_done), C(bytes_total)), replaced atomically
        about twice a second. The agent polls it.
    type: path
notes:
  - Supports check mode (opens the source, reports which slot would be written, writes nothing).
seealso:
  - module: kubeos.os.slot_info
  - module: kubeos.os.boot_slot
"""

EXAMPLES = r"""
- name: Write v2 into the inactive slot from an HTTPS server with mutual TLS
  kubeos.os.slot_write:
    src: https://images.example.com/kubeos/v2/rootfs.img
    sha256: 5f0c0a9e4b3d2f7a1c9e8d7b6a5f4e3d2c1b0a9f8e7d6c5b4a3f2e1d0c9b8a7f
    ca_cert: /etc/KubeOS/certs/ca.crt
    client_cert: /etc/KubeOS/certs/client.crt
    client_key: /etc/KubeOS/certs/client.key

- name: Put a root filesystem archive into slot B of a disk image
  kubeos.os.slot_write:
    device: /var/tmp/node.img
    slot: B
    src: file:///var/tmp/rootfs-v2.tar.zst
    sha256: "{{ lookup('ansible.builtin.file', '/var/tmp/rootfs-v2.tar.zst.sha256') }}"
    format: tar
"""

RETURN = r"""
slot:
  description: The slot that was (or would be) written.
  returned: success
  type: str
  sample: B
device:
  description: The partition of that slot.
  returned: success
  type: str
  sample: /dev/vda4
bytes_written:
  description: Bytes streamed into the slot (the archive size for O(format=tar)).
  returned: success
  type: int
seconds:
  description: Time spent streaming and verifying.
  returned: success
  type: float
sha256:
  description: The verified sha256 of the image.
  returned: success
  type: str
version:
  description: VERSION_ID (or VERSION) of the os-release in the written slot.
  returned: success
  type: str
message:
  description: What happened.
  returned: success
  type: str
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.kubeos.os.plugins.module_utils import (
    blockdev,
    fetch,
    grubenv,
    imagewrite,
    slots,
    slotwrite,
)


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(
            device=dict(type="path"),
            running_root=dict(type="str"),
            slot=dict(type="str", choices=list(slots.SLOTS)),
            src=dict(type="str", required=True),
            sha256=dict(type="str", required=True),
            format=dict(type="str", default="raw", choices=list(slotwrite.FORMATS)),
            ca_cert=dict(type="path"),
            client_cert=dict(type="path"),
            client_key=dict(type="path"),
            allow_insecure_http=dict(type="bool", default=False),
            timeout=dict(type="float", default=60.0),
            force=dict(type="bool", default=False),
            progress_file=dict(type="path"),
        ),
        supports_check_mode=True,
    )
    params = module.params
    request = slotwrite.WriteRequest(
        source=fetch.SourceOptions(
            url=params["src"],
            ca_cert=params["ca_cert"],
            client_cert=params["client_cert"],
            client_key=params["client_key"],
            allow_insecure_http=params["allow_insecure_http"],
            timeout=params["timeout"],
        ),
        sha256=params["sha256"],
        format=params["format"],
        slot=params["slot"],
        force=params["force"],
        progress_file=params["progress_file"],
    )
    try:
        with slots.open_disk(params["device"], params["running_root"]) as disk:
            outcome = slotwrite.write_slot(
                disk, request, running_root=params["running_root"], check_mode=module.check_mode
            )
    except (
        slots.LayoutError,
        slots.SlotError,
        blockdev.DeviceError,
        grubenv.GrubEnvError,
        fetch.SourceError,
        imagewrite.WriteError,
        imagewrite.ChecksumMismatch,
        imagewrite.Cancelled,
    ) as exc:
        module.fail_json(msg=str(exc))
    except blockdev.CommandError as exc:
        module.fail_json(msg=str(exc), rc=exc.rc, stdout=exc.out, stderr=exc.err, cmd=exc.argv)
    module.exit_json(changed=outcome.changed, **outcome.to_dict())


if __name__ == "__main__":
    main()
