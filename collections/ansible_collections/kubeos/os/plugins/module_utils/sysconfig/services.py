# Copyright: kubeos contributors
# Apache License 2.0 (see LICENSE)
"""Service actions after a change, each off unless asked for: load the changed persistent sysctl files
into the running kernel, restart kubelet after its configuration changed, restart containerd after its
configuration changed. They act on the running system, so they are refused with a ``root`` other
than ``/`` (an image being built has no running services)."""

from __future__ import annotations

__metaclass__ = type

from dataclasses import dataclass

from ansible_collections.kubeos.os.plugins.module_utils.sysconfig import models
from ansible_collections.kubeos.os.plugins.module_utils.sysconfig.plan import Plan


@dataclass(frozen=True)
class Action:
    name: str  # reload_sysctl, restart_kubelet, restart_containerd
    program: str  # looked up on the host: sysctl, systemctl
    args: tuple[str, ...]

    def describe(self) -> str:
        return " ".join((self.program, *self.args))


def check(root: str, *, reload_sysctl: bool, restart_kubelet: bool, restart_containerd: bool) -> None:
    asked = [
        name
        for name, on in (
            ("reload_sysctl", reload_sysctl),
            ("restart_kubelet", restart_kubelet),
            ("restart_containerd", restart_containerd),
        )
        if on
    ]
    if asked and root.rstrip("/") != "":
        raise models.SysconfigError(
            f"{', '.join(asked)} act on the running system and cannot be used with root {root!r}; "
            "leave them off when configuring a tree that is not the running root"
        )


def actions(plan: Plan, *, reload_sysctl: bool, restart_kubelet: bool, restart_containerd: bool) -> list[Action]:
    """The actions that are asked for and have something to act on."""
    out: list[Action] = []
    if reload_sysctl:
        for change in plan.changed_targets(models.KERNEL_SYSCTL_PERSIST):
            out.append(Action("reload_sysctl", "sysctl", ("-p", change.target)))
    if restart_kubelet and plan.changed_targets(models.KUBERNETES_KUBELET):
        out.append(Action("restart_kubelet", "systemctl", ("restart", "kubelet.service")))
    if restart_containerd and plan.changed_targets(models.CONTAINER_CONTAINERD):
        out.append(Action("restart_containerd", "systemctl", ("restart", "containerd.service")))
    return out
