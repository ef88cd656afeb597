"""What the proxy reads from the agent's ``GET /v1/status`` and ``GET /v1/operations/{id}`` (docs/agent.md)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


@dataclass(frozen=True)
class SlotView:
    pretty_name: str = ""
    version: str = ""
    bootable: bool = False


@dataclass(frozen=True)
class OperationView:
    """An agent operation: ``state`` queued/running/succeeded/failed/canceled/interrupted, ``outcome`` for
    upgrade and rollback across the reboot (pending-reboot, committed, rolled-back, fell-back, abandoned,
    switched)."""

    id: str = ""
    kind: str = ""
    state: str = ""
    phase: str = ""
    outcome: str = ""
    outcome_detail: str = ""
    error: str = ""
    percent: float | None = None
    result: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> OperationView:
        data = _dict(data)
        progress = _dict(data.get("progress"))
        percent = progress.get("percent")
        return cls(
            id=str(data.get("id") or ""),
            kind=str(data.get("kind") or ""),
            state=str(data.get("state") or ""),
            phase=str(data.get("phase") or ""),
            outcome=str(data.get("outcome") or ""),
            outcome_detail=str(data.get("outcome_detail") or ""),
            error=str(data.get("error") or ""),
            percent=float(percent) if isinstance(percent, int | float) else None,
            result=_dict(data.get("result")),
        )

    @property
    def running(self) -> bool:
        return self.state in ("queued", "running")

    @property
    def succeeded(self) -> bool:
        return self.state == "succeeded"


@dataclass(frozen=True)
class AgentView:
    """The node as the agent sees it: which slot runs, what each slot holds, the GRUB state."""

    running_slot: str = ""
    default_slot: str = ""
    trial_slot: str = ""
    slots: dict[str, SlotView] = field(default_factory=dict)
    current: OperationView | None = None
    last_upgrade: OperationView | None = None
    disk_error: str = ""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AgentView:
        disk = _dict(data.get("disk"))
        grub = _dict(disk.get("grub"))
        slots = {
            str(name): SlotView(
                pretty_name=str(_dict(s).get("pretty_name") or ""),
                version=str(_dict(s).get("version") or ""),
                bootable=bool(_dict(s).get("bootable")),
            )
            for name, s in _dict(disk.get("slots")).items()
        }
        current = data.get("current_operation")
        last = data.get("last_upgrade")
        return cls(
            running_slot=str(disk.get("running_slot") or ""),
            default_slot=str(grub.get("default") or ""),
            trial_slot=str(grub.get("trial") or ""),
            slots=slots,
            current=OperationView.from_dict(current) if isinstance(current, dict) else None,
            last_upgrade=OperationView.from_dict(last) if isinstance(last, dict) else None,
            disk_error=str(data.get("disk_error") or ""),
        )

    @property
    def running_version(self) -> str:
        slot = self.slots.get(self.running_slot)
        return slot.pretty_name if slot else ""

    @property
    def other_slot(self) -> str:
        return next((name for name in sorted(self.slots) if name != self.running_slot), "")

    def committed(self, version: str) -> bool:
        """The node runs ``version`` on a committed slot with no trial pending: KubeOS's "done", done right."""
        return (
            bool(self.running_slot)
            and self.running_slot == self.default_slot
            and not self.trial_slot
            and matches(self.running_version, self.slots.get(self.running_slot, SlotView()).version, version)
        )


def matches(pretty_name: str, version_id: str, target: str) -> bool:
    """``osversion`` names a PRETTY_NAME in KubeOS; a VERSION_ID is accepted too."""
    return bool(target) and target in (pretty_name, version_id)
