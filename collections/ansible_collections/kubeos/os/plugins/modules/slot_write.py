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
  - An V(oci://) source is a container image whose root filesystem is the OS (KubeOS's C(imagetype) C(docker) or
    C(containerd)). It is pulled straight from the registry over HTTPS, without a container daemon; the
    reference must resolve to the digest given as O(sha256) (a digest in the reference must be the same one),
    the entry of O(platform) is taken from an image index, and nothing is written unless all of that matched.
    The slot is then formatted (ext4) and the layers are extracted in order with GNU tar, each one hashed while
    it streams (a layer whose sha256 differs from its digest fails the write and leaves the slot not bootable),
    with the OCI whiteouts applied (C(.wh.NAME) removes NAME, C(.wh..wh..opq) empties a directory) inside the
    slot only.
  - Registry authentication follows the registry's challenge, C(Bearer) (token service, anonymous or with
    O(registry_username)/O(registry_password)) or C(Basic); O(ca_cert), O(client_cert) and O(client_key) apply
    to the registry, its token service and blob redirects.
  - Writing the image the slot already holds (same sha256, still marked bootable) changes nothing unless
    O(force=true).
author:
  - kubeos contributors (@kubeos)
requirements:
  - util-linux, e2fsprogs, GNU tar (for O(format=tar) and V(oci://) images; zstd for zstd-compressed layers)
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
      - Or V(oci://) followed by a container image reference as Docker, Podman and KubeOS write it,
        V(oci://registry.example.com:5000/kubeos/os@sha256:…), V(oci://registry.example.com/kubeos/os:v2) or
        V(oci://registry.example.com/kubeos/os) (tag V(latest)). A first component without C(.) or C(:) (and not
        C(localhost)) means Docker Hub. The registry is always reached over HTTPS.
    type: str
    required: true
  sha256:
    description:
      - The expected sha256 of the image (64 hex digits, optionally prefixed with V(sha256:)).
      - For an V(oci://) image, the image digest (KubeOS's C(checksum)) - the digest of what the reference names,
        an image index or a manifest, as C(docker buildx imagetools inspect), C(crane digest) or
        C(skopeo inspect) show it. A tag must still point at it, or nothing is written.
    type: str
    required: true
  format:
    description:
      - V(raw) for a filesystem image, V(tar) for a root filesystem archive. Default V(raw).
      - Not used with an V(oci://) source, whose layers are always extracted into a freshly formatted slot;
        giving it there is an error.
    type: str
    choices: [raw, tar]
  ca_cert:
    description:
      - PEM file of the certificate authority to trust for V(https://) instead of the system's.
      - For V(oci://), the CA of the registry (and of its token service and blob redirects).
    type: path
  client_cert:
    description: PEM client certificate for mutual TLS (with an V(oci://) source, presented to the registry too).
    type: path
  client_key:
    description: PEM private key of O(client_cert) (when not in the same file).
    type: path
  allow_insecure_http:
    description:
      - Allow plain V(http://) sources (KubeOS's C(flagSafe)). The sha256 still has to match.
      - With V(oci://), it only allows a plain V(http://) token service or blob redirect, never with credentials;
        the registry itself is always reached over HTTPS.
    type: bool
    default: false
  registry_username:
    description:
      - User name for the registry of an V(oci://) source, sent (over HTTPS only) when the registry or its token
        service asks for it. Without it, pulls are anonymous.
    type: str
  registry_password:
    description: Password or access token of O(registry_username).
    type: str
  platform:
    description:
      - The platform to take from an image index or manifest list of an V(oci://) source, as C(os/architecture)
        or C(os/architecture/variant). Default is this host's (V(linux/amd64) on x86-64).
      - A single-platform image for another platform is refused.
    type: str
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

- name: Write the OS image v2 from a registry, by digest, with mutual TLS (KubeOS imagetype containerd)
  kubeos.os.slot_write:
    src: oci://registry.example.com:5000/kubeos/os@sha256:6c3c624b58dbbcd3c0dd82b4c53f04194d1247c6eebdaab7c610cf7d66709b3b
    sha256: 6c3c624b58dbbcd3c0dd82b4c53f04194d1247c6eebdaab7c610cf7d66709b3b
    ca_cert: /etc/KubeOS/certs/ca.crt
    client_cert: /etc/KubeOS/certs/client.crt
    client_key: /etc/KubeOS/certs/client.key

- name: Write the image a tag names, only if the tag still points at the expected digest
  kubeos.os.slot_write:
    src: oci://registry.example.com/kubeos/os:v2
    sha256: sha256:6c3c624b58dbbcd3c0dd82b4c53f04194d1247c6eebdaab7c610cf7d66709b3b
    registry_username: puller
    registry_password: "{{ vault_registry_token }}"

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
  description: Bytes streamed into the slot (the archive size for O(format=tar), the sum of the layer sizes for V(oci://)).
  returned: success
  type: int
seconds:
  description: Time spent streaming and verifying.
  returned: success
  type: float
sha256:
  description: The verified sha256 of the image (for V(oci://), the image digest without V(sha256:)).
  returned: success
  type: str
image:
  description: The V(oci://) image by digest, C(registry/repository@sha256:…).
  returned: success, with an V(oci://) source
  type: str
  sample: registry.example.com:5000/kubeos/os@sha256:6c3c624b58dbbcd3c0dd82b4c53f04194d1247c6eebdaab7c610cf7d66709b3b
layers:
  description: How many layers the V(oci://) image has (null when nothing was written because the slot already held it).
  returned: success, with an V(oci://) source
  type: int
  sample: 2
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
            format=dict(type="str", choices=list(slotwrite.FORMATS)),
            ca_cert=dict(type="path"),
            client_cert=dict(type="path"),
            client_key=dict(type="path"),
            allow_insecure_http=dict(type="bool", default=False),
            timeout=dict(type="float", default=60.0),
            force=dict(type="bool", default=False),
            progress_file=dict(type="path"),
            registry_username=dict(type="str"),
            registry_password=dict(type="str", no_log=True),
            platform=dict(type="str"),
        ),
        required_together=[("registry_username", "registry_password")],
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
        registry_username=params["registry_username"],
        registry_password=params["registry_password"],
        platform=params["platform"],
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
