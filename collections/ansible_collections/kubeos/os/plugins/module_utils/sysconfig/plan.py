# Copyright: kubeos contributors
# Apache License 2.0 (see LICENSE)
"""From configuration entries to the changes they make, computed without writing anything.

1. :func:`check` — every entry on its own: model, key syntax, value types, configpath (all problems
   reported together).
2. :func:`build` — every entry against the node, in order, on in-memory copies: each file, /proc/sys
   setting and the GRUB environment is read once, and entries that name the same target see each
   other's changes. A missing sysctl key, a key path through a non-mapping, a GRUB environment that would
   overflow its block are found here — still before anything is written.
3. :mod:`transaction` writes each changed target once, undoing the earlier ones if one fails.
"""

from __future__ import annotations

__metaclass__ = type

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ansible_collections.kubeos.os.plugins.module_utils import atomicfile, grubenv
from ansible_collections.kubeos.os.plugins.module_utils.sysconfig import (
    cmdline,
    containerd,
    kubelet,
    models,
    pamlimits,
    paths,
    sysctl,
    transaction,
)
from ansible_collections.kubeos.os.plugins.module_utils.sysconfig.cmdline import GrubAccess
from ansible_collections.kubeos.os.plugins.module_utils.sysconfig.models import Applied, ConfigEntry

_CHECKS: dict[str, Callable[[ConfigEntry], list[str]]] = {
    models.KERNEL_SYSCTL: sysctl.check,
    models.KERNEL_SYSCTL_PERSIST: sysctl.check,
    models.GRUB_CMDLINE_CURRENT: cmdline.check,
    models.GRUB_CMDLINE_NEXT: cmdline.check,
    models.KUBERNETES_KUBELET: kubelet.check,
    models.CONTAINER_CONTAINERD: containerd.check,
    models.PAM_LIMITS: pamlimits.check,
}


def _documents() -> dict[str, Callable[[bytes, str], Any]]:
    return {
        models.KERNEL_SYSCTL_PERSIST: lambda data, _path: sysctl.PersistDocument(data),
        models.KUBERNETES_KUBELET: kubelet.YamlDocument,
        models.CONTAINER_CONTAINERD: containerd.TomlDocument,
        models.PAM_LIMITS: lambda data, _path: pamlimits.LimitsDocument(data),
    }


@dataclass
class EntryResult:
    index: int
    model: str
    target: str
    applied: list[Applied] = field(default_factory=list)
    slot: str | None = None

    @property
    def changed(self) -> bool:
        return any(a.changed for a in self.applied)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "index": self.index,
            "model": self.model,
            "target": self.target,
            "changed": self.changed,
            "contents": [a.to_dict() for a in self.applied],
        }
        if self.slot:
            data["slot"] = self.slot
        return data


@dataclass
class Plan:
    entries: list[EntryResult]
    changes: list[transaction.Change]

    @property
    def changed(self) -> bool:
        return bool(self.changes)

    def diffs(self) -> list[dict[str, Any]]:
        return [change.diff() for change in self.changes]

    def changed_models(self) -> set[str]:
        return {change.model for change in self.changes}

    def changed_targets(self, model: str) -> list[transaction.Change]:
        return [change for change in self.changes if change.model == model]


def parse(raw: Any) -> list[ConfigEntry]:
    """KubeOS's ``configs`` list as entries, with every problem that shows without looking at the node
    reported at once (SysconfigError)."""
    entries, errors = models.read_configs(raw)
    models.raise_all(errors + _problems(entries))
    return entries


def check(entries: list[ConfigEntry]) -> None:
    """Every problem that shows without looking at the node; SysconfigError names them all."""
    models.raise_all(_problems(entries))


def _problems(entries: list[ConfigEntry]) -> list[str]:
    errors: list[str] = []
    for entry in entries:
        errors += _CHECKS[entry.model](entry)
        if entry.model in paths.PLACES:
            try:
                paths.check_configpath(entry.model, entry.configpath)
            except paths.PathError as exc:
                errors.append(f"{entry.where}: {exc}")
    return errors


def needs_grub(entries: list[ConfigEntry]) -> bool:
    return any(entry.model in models.GRUB_MODELS and entry.contents for entry in entries)


@dataclass
class _OpenFile:
    model: str
    target: paths.Target
    snapshot: atomicfile.Snapshot
    document: Any


def build(entries: list[ConfigEntry], root: str, grub: GrubAccess | None = None) -> Plan:
    """Apply ``entries`` to in-memory copies of their targets; return the results and the changes to write."""
    check(entries)
    try:
        return _build(entries, root, grub)
    except models.SysconfigError as exc:
        text = str(exc)
        if "nothing was changed" not in text:
            text += "; nothing was changed"
        raise models.SysconfigError(text) from None


def _build(entries: list[ConfigEntry], root: str, grub: GrubAccess | None) -> Plan:
    documents = _documents()
    files: dict[str, _OpenFile] = {}
    settings: dict[str, sysctl.RuntimeSetting] = {}
    kernel_args: dict[str, cmdline.KernelArgs] = {}
    order: list[tuple[str, str]] = []  # (kind, key) of each target, first use first
    results: list[EntryResult] = []

    for entry in entries:
        if entry.model == models.KERNEL_SYSCTL:
            result = EntryResult(entry.index, entry.model, "/proc/sys")
            for content in entry.contents:
                path = sysctl.proc_path(root, content.key)
                if path not in settings:
                    try:
                        settings[path] = sysctl.RuntimeSetting.read(root, content.key)
                    except models.SysconfigError as exc:
                        raise models.SysconfigError(content.problem(entry.model, str(exc))) from None
                    order.append(("sysctl", path))
                result.applied.append(settings[path].apply(content))
            results.append(result)
        elif entry.model in models.GRUB_MODELS:
            if grub is None:
                raise models.SysconfigError(f"{entry.where}: no disk to set kernel arguments on")
            if grub.refusal:
                raise models.SysconfigError(f"{entry.where}: {grub.refusal}")
            slot = grub.current_slot if entry.model == models.GRUB_CMDLINE_CURRENT else grub.next_slot
            if slot not in kernel_args:
                kernel_args[slot] = cmdline.KernelArgs(grub.env.get(cmdline.variable(slot), ""))
                if ("grubenv", "") not in order:
                    order.append(("grubenv", ""))
            result = EntryResult(entry.index, entry.model, f"GRUB environment {cmdline.variable(slot)}", slot=slot)
            for content in entry.contents:
                result.applied.append(kernel_args[slot].apply(content))
            results.append(result)
        else:
            try:
                target = paths.target(root, entry.model, entry.configpath)
            except (paths.PathError, OSError) as exc:
                raise models.SysconfigError(f"{entry.where}: {exc}") from None
            opened = files.get(target.host_path)
            if opened is None:
                try:
                    snapshot = atomicfile.snapshot(target.host_path)
                except OSError as exc:
                    raise models.SysconfigError(f"{entry.where}: cannot read {target.path}: {exc}") from None
                try:
                    document = documents[entry.model](snapshot.data, target.path)
                except models.SysconfigError as exc:
                    raise models.SysconfigError(f"{entry.where}: {exc}") from None
                opened = _OpenFile(entry.model, target, snapshot, document)
                files[target.host_path] = opened
                order.append(("file", target.host_path))
            elif opened.model != entry.model:
                raise models.SysconfigError(
                    f"{entry.where}: {target.path} is also edited as {opened.model} by an earlier entry; "
                    "one file has one format"
                )
            result = EntryResult(entry.index, entry.model, target.path)
            for content in entry.contents:
                result.applied.append(opened.document.apply(content))
            results.append(result)

    changes: list[transaction.Change] = []
    for kind, key in order:
        if kind == "file":
            opened = files[key]
            data = opened.document.render()
            if data != opened.snapshot.data and (opened.snapshot.existed or data):
                changes.append(
                    transaction.FileChange(opened.target.path, key, opened.snapshot, data, model=opened.model)
                )
        elif kind == "sysctl":
            setting = settings[key]
            if setting.changed and setting.current is not None:
                changes.append(
                    transaction.SysctlChange(
                        setting.node_path, key, setting.original, setting.current, model=models.KERNEL_SYSCTL
                    )
                )
        elif grub is not None:
            change = _grub_change(grub, kernel_args)
            if change is not None:
                changes.append(change)
    return Plan(entries=results, changes=changes)


def _grub_change(grub: GrubAccess, kernel_args: dict[str, cmdline.KernelArgs]) -> transaction.GrubEnvChange | None:
    updates: dict[str, str | None] = {}
    for slot, args in kernel_args.items():
        updates.update(cmdline.env_update(grub.env, slot, args))
    after = grubenv.update(grub.env, updates)
    if after == grub.env:
        return None
    try:
        grubenv.encode(after)
    except grubenv.GrubEnvError as exc:
        names = ", ".join(sorted(updates))
        raise models.SysconfigError(
            f"the kernel arguments do not fit into the GRUB environment block ({names}): {exc}"
        ) from None
    return transaction.GrubEnvChange(
        "GRUB environment (BOOT grub/grubenv)", dict(grub.env), after, grub.write, model="grub.cmdline"
    )
