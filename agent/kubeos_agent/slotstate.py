"""Reading the node's slots and GRUB state for status and for the after-reboot decision.

This reads with the collection's own ``module_utils.slots`` (the same code ``kubeos.os.slot_info``
runs), in-process: a status request must not cost an ansible-runner start (about 1.5 s). Everything
that *changes* the disk goes through a playbook. The collection must be importable, which the daemon
arranges from ``collections_path`` before importing this module.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from ansible_collections.kubeos.os.plugins.module_utils import blockdev, grubenv, slots

from .config import AgentConfig


class DiskReadError(Exception):
    """The disk could not be read; the message says why."""


@dataclass
class SlotView:
    name: str
    device: str
    partuuid: str
    version: str
    pretty_name: str
    bootable: bool
    marked_bootable: bool
    image_sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "device": self.device,
            "partuuid": self.partuuid,
            "version": self.version,
            "pretty_name": self.pretty_name,
            "bootable": self.bootable,
            "marked_bootable": self.marked_bootable,
            "image_sha256": self.image_sha256,
        }


@dataclass
class DiskView:
    """What the agent needs to know about the disk, taken at ``taken``."""

    layout: str
    disk: str
    running_root: str | None
    running_slot: str | None
    active_slot: str
    inactive_slot: str
    default: str
    trial: str | None
    tries: int | None
    trial_failed: str | None
    slots: dict[str, SlotView] = field(default_factory=dict)
    taken: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return {
            "layout": self.layout,
            "disk": self.disk,
            "running_root": self.running_root,
            "running_slot": self.running_slot,
            "active_slot": self.active_slot,
            "inactive_slot": self.inactive_slot,
            "slots": {name: view.to_dict() for name, view in self.slots.items()},
            "grub": {
                "default": self.default,
                "trial": self.trial,
                "tries": self.tries,
                "trial_failed": self.trial_failed,
            },
        }


def read(config: AgentConfig) -> DiskView:
    """Read the disk now (mounts each slot read-only for a moment)."""
    try:
        with slots.open_disk(config.device, config.running_root, writable=False) as disk:
            state = slots.read_state(disk, config.running_root)
    except (slots.LayoutError, slots.SlotError, blockdev.DeviceError, grubenv.GrubEnvError) as exc:
        raise DiskReadError(str(exc)) from exc
    except blockdev.CommandError as exc:
        raise DiskReadError(f"{exc} (rc {exc.rc}): {exc.err.strip()}") from exc
    grub = state.grub
    views = {
        name: SlotView(
            name=name,
            device=facts.part.node if not config.device else f"{config.device} ({facts.part.partlabel})",
            partuuid=facts.part.partuuid,
            version=facts.content.version,
            pretty_name=facts.content.pretty_name,
            bootable=facts.bootable,
            marked_bootable=facts.marked_bootable,
            image_sha256=grub.env.get(f"kubeos_{name}_image", ""),
        )
        for name, facts in state.slots.items()
    }
    return DiskView(
        layout=state.layout.kind,
        disk=config.device or state.layout.disk,
        running_root=state.running_root,
        running_slot=state.running_slot,
        active_slot=state.active_slot,
        inactive_slot=state.inactive_slot,
        default=grub.default,
        trial=grub.trial,
        tries=grub.tries,
        trial_failed=grub.trial_failed,
        slots=views,
    )
