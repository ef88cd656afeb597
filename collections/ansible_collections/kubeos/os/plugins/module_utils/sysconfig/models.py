# Copyright: kubeos contributors
# Apache License 2.0 (see LICENSE)
"""KubeOS's configuration entries (``sysconfigs.configs`` of an ``OS`` object), read and checked.

An entry is ``{model, configpath, contents: [{key, value, operation}]}``. ``operation`` is empty (add or
update; KubeOS's own examples also write ``add`` and ``update``) or ``delete``; ``value`` is any JSON value.
Everything here is checked before any file, sysctl or GRUB variable is looked at, and every problem found
is reported at once, each with the place it was found (``configs[1].contents[0]``).
"""

from __future__ import annotations

__metaclass__ = type

import math
from dataclasses import dataclass, field
from typing import Any

KERNEL_SYSCTL = "kernel.sysctl"
KERNEL_SYSCTL_PERSIST = "kernel.sysctl.persist"
GRUB_CMDLINE_CURRENT = "grub.cmdline.current"
GRUB_CMDLINE_NEXT = "grub.cmdline.next"
KUBERNETES_KUBELET = "kubernetes.kubelet"
CONTAINER_CONTAINERD = "container.containerd"
PAM_LIMITS = "pam.limits"

MODELS = (
    KERNEL_SYSCTL,
    KERNEL_SYSCTL_PERSIST,
    GRUB_CMDLINE_CURRENT,
    GRUB_CMDLINE_NEXT,
    KUBERNETES_KUBELET,
    CONTAINER_CONTAINERD,
    PAM_LIMITS,
)
GRUB_MODELS = (GRUB_CMDLINE_CURRENT, GRUB_CMDLINE_NEXT)
FILE_MODELS = (KERNEL_SYSCTL_PERSIST, KUBERNETES_KUBELET, CONTAINER_CONTAINERD, PAM_LIMITS)

DELETE = "delete"
SET_OPERATIONS = ("", "add", "update")
ENTRY_FIELDS = ("model", "configpath", "contents")
CONTENT_FIELDS = ("key", "value", "operation")


class SysconfigError(Exception):
    """Configuration that cannot be applied. Raised before anything was changed."""


@dataclass
class Content:
    """One ``{key, value, operation}`` of an entry."""

    key: str
    value: Any
    operation: str  # "" (add or update) or "delete"
    where: str  # "configs[0].contents[1]", for messages

    @property
    def delete(self) -> bool:
        return self.operation == DELETE

    def problem(self, model: str, message: str) -> str:
        return f"{self.where} ({model} {self.key!r}): {message}"


@dataclass
class ConfigEntry:
    index: int
    model: str
    configpath: str
    contents: list[Content] = field(default_factory=list)

    @property
    def where(self) -> str:
        return f"configs[{self.index}] ({self.model})"


@dataclass
class Applied:
    """What one content did (or, in check mode, would do): the value it replaced and the value it left."""

    key: str
    operation: str  # "set" or "delete"
    before: Any
    after: Any
    changed: bool
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        data = {
            "key": self.key,
            "operation": self.operation,
            "before": self.before,
            "after": self.after,
            "changed": self.changed,
        }
        if self.note:
            data["note"] = self.note
        return data


def applied(content: Content, before: Any, after: Any, note: str = "") -> Applied:
    return Applied(
        key=content.key,
        operation="delete" if content.delete else "set",
        before=before,
        after=after,
        changed=not same(before, after),
        note=note,
    )


def same(a: Any, b: Any) -> bool:
    """Equal as JSON values: ``1``, ``1.0``, ``True`` and ``"1"`` are four different values."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return isinstance(a, float) == isinstance(b, float) and a == b
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return set(a) == set(b) and all(same(a[k], b[k]) for k in a)
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, str) and isinstance(b, str):
        return a == b
    return bool(a == b) and type(a) is type(b)


def kind_of(value: Any) -> str:
    """The JSON name of a value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def json_problem(value: Any, depth: int = 0) -> str | None:
    """Why ``value`` is not a plain JSON value (None when it is)."""
    if depth > 64:
        return "the value is nested too deeply"
    if value is None or isinstance(value, (bool, int, str)):
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{value!r} is not a number JSON can carry"
    if isinstance(value, (list, tuple)):
        for item in value:
            problem = json_problem(item, depth + 1)
            if problem:
                return problem
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return f"mapping keys must be strings, not {kind_of(key)} ({key!r})"
            problem = json_problem(item, depth + 1)
            if problem:
                return problem
        return None
    return f"{kind_of(value)} is not a JSON value"


def is_word(value: Any) -> bool:
    """A string or an integer (not a boolean): what line-based files and the kernel take as a value."""
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def word(value: Any) -> str:
    """The text of a string or integer value."""
    return value if isinstance(value, str) else str(value)


def is_empty(value: Any) -> bool:
    """null or an empty (or all-blank) string: "no value" in KubeOS's models."""
    return value is None or (isinstance(value, str) and not value.strip())


def _parse_content(entry_where: str, index: int, raw: Any, errors: list[str]) -> Content | None:
    where = f"{entry_where}.contents[{index}]"
    if not isinstance(raw, dict):
        errors.append(f"{where}: each content must be a mapping with key, value and operation, not {kind_of(raw)}")
        return None
    unknown = sorted(str(k) for k in raw if k not in CONTENT_FIELDS)
    if unknown:
        errors.append(f"{where}: unknown field(s) {', '.join(unknown)}; a content has only key, value and operation")
        return None
    key = raw.get("key")
    if not isinstance(key, str) or not key.strip():
        errors.append(f"{where}: key is required and must be a non-empty string, not {kind_of(key)} {key!r}")
        return None
    operation = raw.get("operation")
    operation = "" if operation is None else operation
    if not isinstance(operation, str) or operation.strip().lower() not in (*SET_OPERATIONS, DELETE):
        errors.append(
            f"{where} (key {key.strip()!r}): unknown operation {operation!r}; leave it empty to add or update, "
            "or write 'delete'"
        )
        return None
    operation = operation.strip().lower()
    value = raw.get("value")
    problem = json_problem(value)
    if problem:
        errors.append(f"{where} (key {key.strip()!r}): {problem}")
        return None
    return Content(key=key.strip(), value=value, operation=DELETE if operation == DELETE else "", where=where)


def parse_configs(raw: Any) -> list[ConfigEntry]:
    """The entries of ``raw`` (KubeOS's ``configs`` list). SysconfigError lists every problem found."""
    entries, errors = read_configs(raw)
    raise_all(errors)
    return entries


def read_configs(raw: Any) -> tuple[list[ConfigEntry], list[str]]:
    """The well-formed entries of ``raw`` and the problems of the others."""
    if raw is None:
        return [], []
    if not isinstance(raw, (list, tuple)):
        return [], [f"configs must be a list of {{model, configpath, contents}} entries, not {kind_of(raw)}"]
    entries: list[ConfigEntry] = []
    errors: list[str] = []
    for index, item in enumerate(raw):
        where = f"configs[{index}]"
        if not isinstance(item, dict):
            errors.append(f"{where}: each entry must be a mapping with model, configpath and contents")
            continue
        unknown = sorted(str(k) for k in item if k not in ENTRY_FIELDS)
        if unknown:
            errors.append(f"{where}: unknown field(s) {', '.join(unknown)}; an entry has model, configpath, contents")
            continue
        model = item.get("model")
        if model not in MODELS:
            errors.append(f"{where}: unknown model {model!r}; use one of {', '.join(MODELS)}")
            continue
        configpath = item.get("configpath")
        configpath = "" if configpath is None else configpath
        if not isinstance(configpath, str):
            errors.append(
                f"{where} ({model}): configpath must be a string (an absolute path), not {kind_of(configpath)}"
            )
            continue
        contents = item.get("contents")
        contents = [] if contents is None else contents
        if not isinstance(contents, (list, tuple)):
            errors.append(f"{where} ({model}): contents must be a list of {{key, value, operation}}")
            continue
        entry = ConfigEntry(index=index, model=model, configpath=configpath.strip())
        for number, raw_content in enumerate(contents):
            content = _parse_content(where, number, raw_content, errors)
            if content is not None:
                entry.contents.append(content)
        entries.append(entry)
    return entries, errors


def _joined(errors: list[str]) -> str:
    if len(errors) == 1:
        return errors[0] + "; nothing was changed"
    return f"{len(errors)} problems, nothing was changed: " + "; ".join(errors)


def raise_all(errors: list[str]) -> None:
    """Raise one SysconfigError naming every problem, if there are any."""
    if errors:
        raise SysconfigError(_joined(errors))
