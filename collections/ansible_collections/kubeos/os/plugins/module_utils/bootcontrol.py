# Copyright: kubeos contributors
# Apache License 2.0 (see LICENSE)
"""Deciding GRUB environment changes: arm a trial boot, commit a slot, roll back.

Pure functions over a ``slots.DiskState``: they return the variables to set (``None`` unsets)
or raise ``slots.SlotError`` with what to do instead. Writing is ``slots.BootEnv``'s job.
"""

from __future__ import annotations

__metaclass__ = type

from dataclasses import dataclass, field

from ansible_collections.kubeos.os.plugins.module_utils import grubcfg, slots

STATE_TRIAL = "trial"
STATE_COMMITTED = "committed"
STATE_ROLLBACK = "rollback"
STATES = (STATE_TRIAL, STATE_COMMITTED, STATE_ROLLBACK)


@dataclass
class BootChange:
    slot: str
    set_vars: dict[str, str | None] = field(default_factory=dict)
    message: str = ""


def why_not_bootable(state: slots.DiskState, slot: str) -> str | None:
    """None when ``slot`` holds a verified OS with a kernel; otherwise the reason."""
    facts = state.slots[slot]
    if not facts.marked_bootable:
        return (
            f"slot {slot} is marked not bootable (empty, being written, or its last write failed); "
            "write an image into it with kubeos.os.slot_write first"
        )
    if not facts.content.os_release:
        return f"slot {slot} ({facts.part.node}) holds no /etc/os-release or /usr/lib/os-release"
    if not facts.content.has_kernel:
        return f"slot {slot} ({facts.part.node}) holds no kernel at {slots.KERNEL_PATH}"
    return None


def _require_bootable(state: slots.DiskState, slot: str, action: str) -> None:
    reason = why_not_bootable(state, slot)
    if reason:
        raise slots.SlotError(f"refusing to {action}: {reason}")


def plan(state: slots.DiskState, desired: str, slot: str | None = None, tries: int = 3) -> BootChange:
    """The GRUB environment change that brings the disk into ``desired`` state."""
    if desired not in STATES:
        raise slots.SlotError(f"unknown state {desired!r}: use one of {', '.join(STATES)}")
    if state.layout.kind == slots.LAYOUT_LEGACY:
        return _plan_legacy(state, desired, slot)
    grub = state.grub
    if desired == STATE_TRIAL:
        target = slots.check_slot_name(slot) if slot else state.inactive_slot
        if not 1 <= tries <= grubcfg.MAX_TRIES:
            raise slots.SlotError(f"tries must be between 1 and {grubcfg.MAX_TRIES}, got {tries}")
        if target == grub.default:
            raise slots.SlotError(
                f"slot {target} is already the committed slot; a trial boot is for the other slot "
                f"({slots.other_slot(target)}) after writing an image into it"
            )
        _require_bootable(state, target, f"arm a trial boot of slot {target}")
        return BootChange(
            target,
            {"kubeos_trial": target, "kubeos_tries": str(tries), "kubeos_trial_failed": None},
            f"slot {target} will boot on trial up to {tries} times; slot {grub.default} stays committed",
        )
    if desired == STATE_COMMITTED:
        if slot:
            target = slots.check_slot_name(slot)
        elif state.running_slot:
            target = state.running_slot
        else:
            target = grub.trial or grub.default
        if state.running_slot and target != state.running_slot:
            raise slots.SlotError(
                f"refusing to commit slot {target}: the system runs slot {state.running_slot}. Commit the slot "
                "you booted after checking it is healthy; to switch to the other slot use state=rollback"
            )
        _require_bootable(state, target, f"commit slot {target}")
        return BootChange(
            target,
            {"kubeos_default": target, "kubeos_trial": None, "kubeos_tries": None},
            f"slot {target} is committed",
        )
    # rollback: make the other slot the committed one.
    current = state.running_slot or grub.default
    target = slots.check_slot_name(slot) if slot else slots.other_slot(current)
    if target == state.running_slot:
        raise slots.SlotError(f"refusing to roll back to slot {target}: it is the running system already")
    _require_bootable(state, target, f"roll back to slot {target}")
    return BootChange(
        target,
        {"kubeos_default": target, "kubeos_trial": None, "kubeos_tries": None},
        f"slot {target} is committed; it boots at the next restart",
    )


def _plan_legacy(state: slots.DiskState, desired: str, slot: str | None) -> BootChange:
    """KubeOS-built disks: GRUB boots ``saved_entry``; there is no trial boot."""
    if desired == STATE_TRIAL:
        raise slots.SlotError(
            "this disk was laid out by KubeOS: its grub.cfg has no trial boot with a try counter. "
            "Use state=committed or state=rollback, or re-create the disk with kubeos.os.disk_layout"
        )
    current = state.running_slot or state.grub.default
    if desired == STATE_COMMITTED:
        target = slots.check_slot_name(slot) if slot else current
    else:
        target = slots.check_slot_name(slot) if slot else slots.other_slot(current)
        if target == state.running_slot:
            raise slots.SlotError(f"refusing to roll back to slot {target}: it is the running system already")
    _require_bootable(state, target, f"make slot {target} the boot default")
    return BootChange(target, {"saved_entry": target}, f"slot {target} is the boot default (saved_entry)")
