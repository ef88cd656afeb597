# Copyright: kubeos contributors
# Apache License 2.0 (see LICENSE)
"""The models ``kernel.sysctl`` (the running kernel, ``/proc/sys``) and ``kernel.sysctl.persist``
(``key = value`` lines of ``/etc/sysctl.conf`` or a file in ``/etc/sysctl.d``).

Keys are written as sysctl(8) takes them: ``net.ipv4.ip_forward`` or ``net/ipv4/ip_forward``; in the
dotted form a ``/`` stands for a dot inside a name (``net.ipv4.conf.eth0/100.rp_filter``). Values are a
string, an integer, or a list of them (``[32768, 60999]`` for ``ip_local_port_range``); values are compared
word by word, so ``"32768 60999"`` and ``"32768\\t60999"`` are the same value.

``kernel.sysctl`` only sets values (a running kernel has no "unset"): the key must exist under
``<root>/proc/sys``. ``kernel.sysctl.persist`` keeps every other line as it is: comments, blank lines,
order and the spacing around ``=``. An update rewrites the value of every line of that key (sysctl applies
the last one, so none may be left stale); a new key is appended; ``delete`` removes every line of the key
— with a value, only when the file holds that value (KubeOS's rule), otherwise the line stays and the
result says why.
"""

from __future__ import annotations

__metaclass__ = type

import os
import re
from dataclasses import dataclass
from typing import Any

from ansible_collections.kubeos.os.plugins.module_utils.sysconfig import models
from ansible_collections.kubeos.os.plugins.module_utils.sysconfig.models import Applied, ConfigEntry, Content

PROC_SYS = "proc/sys"
_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:@+\-]*$")
_LINE = re.compile(r"^(?P<head>\s*-?)(?P<key>[^\s=#;][^=]*?)(?P<sep>\s*=\s*)(?P<value>.*?)(?P<tail>\s*)$")
_ENCODING = "utf-8"
_ERRORS = "surrogateescape"


class SysctlKeyError(ValueError):
    pass


def key_parts(key: str) -> list[str]:
    """The /proc/sys path parts of a sysctl key, in either of sysctl(8)'s forms."""
    slash, dot = key.find("/"), key.find(".")
    if slash >= 0 and (dot < 0 or slash < dot):
        parts = key.split("/")
    else:
        parts = [part.replace("/", ".") for part in key.split(".")]
    for part in parts:
        if part in ("", ".", "..") or not _PART.match(part):
            raise SysctlKeyError(
                f"{key!r} is not a sysctl key: write names separated by dots such as net.ipv4.ip_forward "
                "(letters, digits, '_', '-', ':', '@', '+')"
            )
    return parts


def canonical(key: str) -> str:
    """One spelling per key: dots between names, ``/`` for dots inside a name."""
    try:
        return ".".join(part.replace(".", "/") for part in key_parts(key))
    except SysctlKeyError:
        return key


def value_words(value: Any) -> list[str]:
    if isinstance(value, (list, tuple)):
        return [models.word(item).strip() for item in value]
    return models.word(value).split()


def _value_problem(value: Any, *, required: bool) -> str | None:
    if models.is_empty(value) or (isinstance(value, (list, tuple)) and not value):
        return "a value is required (to remove a persistent key use operation: delete)" if required else None
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    for item in items:
        if not models.is_word(item):
            return f"the value must be a string, an integer or a list of them, not {models.kind_of(item)}"
        text = models.word(item)
        if "\n" in text or "\r" in text or "\0" in text:
            return "the value must be on one line"
        if isinstance(value, (list, tuple)) and len(text.split()) != 1:
            return f"list items must be single words, not {text!r}"
    return None


def check(entry: ConfigEntry) -> list[str]:
    """Problems of a kernel.sysctl or kernel.sysctl.persist entry that show without looking at the node."""
    errors = []
    runtime = entry.model == models.KERNEL_SYSCTL
    if runtime and entry.configpath:
        errors.append(f"{entry.where}: kernel.sysctl has no configpath (it sets /proc/sys); remove configpath")
    for content in entry.contents:
        try:
            key_parts(content.key)
        except SysctlKeyError as exc:
            errors.append(content.problem(entry.model, str(exc)))
            continue
        if runtime and content.delete:
            errors.append(
                content.problem(
                    entry.model,
                    "a running kernel setting cannot be deleted, only set: give the value you want, or use "
                    "kernel.sysctl.persist with operation delete to drop it from the boot configuration",
                )
            )
            continue
        problem = _value_problem(content.value, required=not content.delete)
        if problem:
            errors.append(content.problem(entry.model, problem))
    return errors


# --- kernel.sysctl: the running kernel ----------------------------------------------------------


def proc_path(root: str, key: str) -> str:
    return os.path.join(root, PROC_SYS, *key_parts(key))


@dataclass
class RuntimeSetting:
    """One /proc/sys file: what it held when first read and what the entries leave in it."""

    key: str
    path: str  # on this host
    node_path: str  # as the node sees it (/proc/sys/…)
    original: str | None  # None: not readable (write-only settings)
    current: str | None

    @classmethod
    def read(cls, root: str, key: str) -> RuntimeSetting:
        path = proc_path(root, key)
        node_path = "/" + PROC_SYS + "/" + "/".join(key_parts(key))
        if not os.path.isfile(path):
            raise models.SysconfigError(
                f"sysctl key {key!r} does not exist on this node ({node_path} not found); "
                "check the spelling, or load the kernel module that provides it first"
            )
        try:
            with open(path, encoding=_ENCODING, errors=_ERRORS) as handle:
                text: str | None = " ".join(handle.read().split())
        except OSError:
            text = None
        return cls(key=key, path=path, node_path=node_path, original=text, current=text)

    def apply(self, content: Content) -> Applied:
        new = " ".join(value_words(content.value))
        before = self.current
        if before is None or before.split() != new.split():
            self.current = new
        return models.applied(content, before, self.current)

    @property
    def changed(self) -> bool:
        return self.current != self.original


# --- kernel.sysctl.persist: sysctl.conf ---------------------------------------------------------


class PersistDocument:
    """A sysctl.conf-style file, edited line by line."""

    def __init__(self, data: bytes) -> None:
        text = data.decode(_ENCODING, _ERRORS)
        self.lines: list[str] = text.splitlines(keepends=True)

    def _entries(self, key: str) -> list[tuple[int, re.Match[str]]]:
        want = canonical(key)
        found = []
        for index, line in enumerate(self.lines):
            stripped = line.strip()
            if not stripped or stripped[0] in "#;":
                continue
            match = _LINE.match(line.rstrip("\r\n"))
            if match and canonical(match.group("key").strip()) == want:
                found.append((index, match))
        return found

    def value_of(self, key: str) -> str | None:
        found = self._entries(key)
        return " ".join(found[-1][1].group("value").split()) if found else None

    def apply(self, content: Content) -> Applied:
        found = self._entries(content.key)
        before = " ".join(found[-1][1].group("value").split()) if found else None
        if content.delete:
            if not found:
                return models.applied(content, None, None, note="not in the file")
            if not models.is_empty(content.value):
                wanted = " ".join(value_words(content.value))
                if wanted.split() != (before or "").split():
                    note = f"kept: the file holds {before!r}, not {wanted!r} (delete without a value removes any)"
                    return models.applied(content, before, before, note=note)
            for index, _match in reversed(found):
                del self.lines[index]
            return models.applied(content, before, None)
        new = " ".join(value_words(content.value))
        if found:
            for index, match in found:
                if match.group("value").split() != new.split():
                    ending = self.lines[index][len(self.lines[index].rstrip("\r\n")) :]
                    self.lines[index] = (
                        match.group("head")
                        + match.group("key")
                        + match.group("sep")
                        + new
                        + match.group("tail")
                        + ending
                    )
            return models.applied(content, before, new)
        if self.lines and not self.lines[-1].endswith("\n"):
            self.lines[-1] += "\n"
        self.lines.append(f"{content.key} = {new}\n")
        return models.applied(content, None, new)

    def render(self) -> bytes:
        return "".join(self.lines).encode(_ENCODING, _ERRORS)
