# Copyright: kubeos contributors
# Apache License 2.0 (see LICENSE)
"""Writing an OS image into a slot, safely.

Order of events, and why:

1. Read the disk; refuse the running slot and the committed fallback slot.
2. Open the source (TLS, client certificate, HTTP status) *before* touching the disk, so a
   bad URL or certificate changes nothing. For an ``oci://`` image that means resolving the
   reference and verifying the manifest against the expected digest (``oci``), and opening the
   first layer.
3. Mark the slot not bootable (and cancel a trial of it) in the GRUB environment, fsynced,
   before the first byte: an interruption from here on leaves a slot GRUB will not boot.
4. Stream the image in, hashing while writing (``imagewrite``); for an ``oci://`` image, format
   the slot and extract its layers in order, each hashed while it streams, with the OCI whiteouts.
5. Only when the sha256 matched (every layer's, for an image): give the filesystem the slot's
   label and mark the slot bootable, recording the image's digest so that writing the same image
   again is a no-op.
"""

from __future__ import annotations

__metaclass__ = type

import json
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable

from ansible_collections.kubeos.os.plugins.module_utils import blockdev, fetch, imagewrite, layout, oci, slots

FORMAT_RAW = "raw"
FORMAT_TAR = "tar"
# What the caller can choose for a URL source; an oci:// source is always a layered image.
FORMATS = (FORMAT_RAW, FORMAT_TAR)
FORMAT_OCI = "oci"


def image_var(slot: str) -> str:
    return f"kubeos_{slot}_image"


def bootable_var(slot: str) -> str:
    return f"kubeos_{slot}_bootable"


@dataclass
class WriteRequest:
    """What to write. ``format`` None means raw for a URL and the layered image for ``oci://``.

    For ``oci://`` sources ``sha256`` is the image digest (of the index or manifest the reference names);
    ``registry_username``/``registry_password`` answer the registry's (or its token service's) challenge
    and ``platform`` (``os/arch[/variant]``, default this host's) picks the image from an index.
    """

    source: fetch.SourceOptions
    sha256: str
    format: str | None = None
    slot: str | None = None
    force: bool = False
    progress_file: str | None = None
    registry_username: str | None = None
    registry_password: str | None = None
    platform: str | None = None

    @property
    def is_oci(self) -> bool:
        return oci.is_oci_url(self.source.url)

    def resolved_format(self) -> str:
        if self.is_oci:
            if self.format not in (None, FORMAT_OCI):
                raise slots.SlotError(
                    f"format {self.format!r} does not apply to an oci:// image: its layers are always extracted "
                    "into a freshly formatted slot; leave format out"
                )
            return FORMAT_OCI
        if self.registry_username is not None or self.registry_password is not None or self.platform:
            raise slots.SlotError(
                "registry_username, registry_password and platform only apply to an oci:// source; leave them out"
            )
        fmt = self.format or FORMAT_RAW
        if fmt not in FORMATS:
            raise slots.SlotError(f"unknown format {fmt!r}: use raw (a filesystem image) or tar (a root filesystem)")
        return fmt


@dataclass
class WriteOutcome:
    slot: str
    device: str
    changed: bool
    bytes_written: int = 0
    seconds: float = 0.0
    sha256: str = ""
    version: str = ""
    message: str = ""
    # oci:// only: the image by digest, and how many layers it has.
    image: str | None = None
    layers: int | None = None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "slot": self.slot,
            "device": self.device,
            "bytes_written": self.bytes_written,
            "seconds": round(self.seconds, 3),
            "sha256": self.sha256,
            "version": self.version,
            "message": self.message,
        }
        if self.image is not None:
            data["image"] = self.image
            data["layers"] = self.layers
        return data


class ProgressFile:
    """Progress as a small JSON file, replaced atomically, for the agent to poll."""

    def __init__(self, path: str | None, slot: str) -> None:
        self.path = path
        self.slot = slot
        self.last = 0.0

    def report(self, phase: str, done: int = 0, total: int | None = None, *, force: bool = False) -> None:
        if not self.path:
            return
        now = time.monotonic()
        if not force and now - self.last < 0.5:
            return
        self.last = now
        data = json.dumps(
            {"phase": phase, "slot": self.slot, "bytes_done": done, "bytes_total": total, "time": time.time()}
        )
        directory = os.path.dirname(os.path.abspath(self.path))
        fd, tmp = tempfile.mkstemp(prefix=".progress-", dir=directory)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(data)
        os.replace(tmp, self.path)


def choose_slot(state: slots.DiskState, wanted: str | None) -> str:
    """The slot to write: ``wanted`` or the inactive one; never a protected one."""
    target = slots.check_slot_name(wanted) if wanted else state.inactive_slot
    reason = state.protected_slots().get(target)
    if reason:
        raise slots.SlotError(f"refusing to write slot {target}: {reason}. Write the other slot")
    part = state.slots[target].part
    points = blockdev.mount_points(part.node)
    if points:
        raise slots.SlotError(
            f"refusing to write slot {target}: {part.node} is mounted at {', '.join(points)}; unmount it"
        )
    return target


def already_written(state: slots.DiskState, slot: str, sha256: str) -> bool:
    facts = state.slots[slot]
    return facts.marked_bootable and state.grub.env.get(image_var(slot), "") == sha256


def write_slot(
    disk: str,
    request: WriteRequest,
    *,
    running_root: str | None = None,
    check_mode: bool = False,
    should_cancel: Callable[[], bool] | None = None,
) -> WriteOutcome:
    fmt = request.resolved_format()
    expected = imagewrite.normalize_sha256(request.sha256)
    # An image reference is checked (syntax, a pinned digest against sha256) before anything else.
    pull = _image_pull(request, expected) if fmt == FORMAT_OCI else None
    state = slots.read_state(disk, running_root)
    if state.layout.kind != slots.LAYOUT_KUBEOS:
        raise slots.SlotError(
            "this disk was laid out by KubeOS; its GRUB config cannot mark a slot not bootable while it is "
            "written, so kubeos will not write it in place. Re-create the disk with kubeos.os.disk_layout"
        )
    wanted = slots.check_slot_name(request.slot) if request.slot else state.inactive_slot
    if not request.force and already_written(state, wanted, expected):
        # Nothing to write, so nothing to protect: even the running slot may be asked for.
        return WriteOutcome(
            slot=wanted,
            device=state.slots[wanted].part.node,
            changed=False,
            sha256=expected,
            version=state.slots[wanted].content.version,
            message=f"slot {wanted} already holds the image {expected}",
            image=pull.pinned if pull is not None else None,
        )
    target = choose_slot(state, wanted)
    part = state.slots[target].part
    outcome = WriteOutcome(slot=target, device=part.node, changed=False, sha256=expected)
    progress = ProgressFile(request.progress_file, target)
    progress.report("connecting", force=True)
    with pull if pull is not None else fetch.open_source(request.source) as source:
        if isinstance(source, oci.ImagePull) and source.image is not None:
            outcome.image = source.image.pinned
            outcome.layers = len(source.image.layers)
        if source.length is not None and fmt == FORMAT_RAW and source.length > part.size:
            raise imagewrite.WriteError(
                f"the image is {source.length} bytes but slot {target} ({part.node}) holds only {part.size} bytes; "
                "nothing was written: use a smaller image or lay the disk out with a bigger root_size"
            )
        outcome.changed = True
        if check_mode:
            outcome.message = f"slot {target} would be written from {outcome.image or source.url}"
            return outcome
        env = slots.BootEnv(state.layout)
        unset_trial = {"kubeos_trial": None, "kubeos_tries": None} if state.grub.trial == target else {}
        env.update({bootable_var(target): "no", image_var(target): None, **unset_trial})

        def report(done: int, total: int | None) -> None:
            progress.report("writing", done, total)

        if isinstance(source, oci.ImagePull):
            result = _write_oci(source, part, target, report, should_cancel)
        elif fmt == FORMAT_RAW:
            result = _write_raw(source, part, expected, report, should_cancel)
        else:
            result = _write_tar(source, part, target, expected, report, should_cancel)
    progress.report("verifying", result.bytes_written, result.bytes_written, force=True)
    _relabel(part.node, slots.SLOT_NAMES[target])
    env.update({bootable_var(target): "yes", image_var(target): expected})
    content = slots.inspect_slot(blockdev.read_table(disk).by_name(slots.SLOT_NAMES[target]) or part)
    progress.report("done", result.bytes_written, result.bytes_written, force=True)
    outcome.bytes_written = result.bytes_written
    outcome.seconds = result.seconds
    outcome.version = content.version
    outcome.message = f"slot {target} holds the verified image {expected}" + (
        f" ({content.pretty_name})" if content.pretty_name else ""
    )
    return outcome


def _image_pull(request: WriteRequest, expected: str) -> oci.ImagePull:
    """The pull of an oci:// image; entering it (``with``) resolves and verifies it against ``expected``."""
    return oci.ImagePull(
        oci.PullOptions(
            source=request.source,
            digest=expected,
            username=request.registry_username,
            password=request.registry_password,
            platform=request.platform,
        )
    )


def _write_raw(
    source: fetch.ImageSource,
    part: blockdev.Partition,
    expected: str,
    report: imagewrite.ProgressCallback,
    should_cancel: Callable[[], bool] | None,
) -> imagewrite.WriteResult:
    try:
        return imagewrite.write_raw(
            source, part.node, expected, capacity=part.size, progress=report, should_cancel=should_cancel
        )
    except imagewrite.ChecksumMismatch:
        # Unverified bytes must never be mounted or booted: drop the filesystem signatures too.
        blockdev.run(["wipefs", "--all", "--force", part.node], check=False)
        raise


def _write_tar(
    source: fetch.ImageSource,
    part: blockdev.Partition,
    slot: str,
    expected: str,
    report: imagewrite.ProgressCallback,
    should_cancel: Callable[[], bool] | None,
) -> imagewrite.WriteResult:
    blockdev.run(["wipefs", "--all", "--force", part.node])
    blockdev.run(["mkfs.ext4", "-q", "-F", "-L", slots.SLOT_NAMES[slot], "-O", layout.EXT4_FEATURES, part.node])
    with blockdev.mounted(part.node, readonly=False) as root:
        return imagewrite.extract_tar(source, root, expected, progress=report, should_cancel=should_cancel)


def _write_oci(
    pull: oci.ImagePull,
    part: blockdev.Partition,
    slot: str,
    report: imagewrite.ProgressCallback,
    should_cancel: Callable[[], bool] | None,
) -> imagewrite.WriteResult:
    blockdev.run(["wipefs", "--all", "--force", part.node])
    blockdev.run(["mkfs.ext4", "-q", "-F", "-L", slots.SLOT_NAMES[slot], "-O", layout.EXT4_FEATURES, part.node])
    with blockdev.mounted(part.node, readonly=False) as root:
        return oci.apply_layers(pull, root, progress=report, should_cancel=should_cancel)


def _relabel(node: str, label: str) -> None:
    """A raw image brings its own filesystem label; the slot's label is what the layout relies on."""
    info = blockdev.probe(node)
    if info.get("TYPE") in slots.ROOT_FILESYSTEMS and info.get("LABEL") != label:
        blockdev.run(["e2label", node, label])
