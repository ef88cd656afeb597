# Copyright: kubeos contributors
# Apache License 2.0 (see LICENSE)
"""The models ``grub.cmdline.current`` and ``grub.cmdline.next``: extra kernel arguments per slot.

``grub.cfg`` (rendered once by ``kubeos.os.disk_layout``, never edited on a node) appends the GRUB
environment variable ``kubeos_<slot>_cmdline`` to each slot's kernel line. So ``grub.cmdline.current``
edits the variable of the running slot (on a disk that is not running: the committed slot) and
``grub.cmdline.next`` the other slot's; the change shows at the next boot of that slot.

Arguments: ``key=value`` (value a string or an integer), a bare ``key`` (value empty or null), and
``delete`` (without a value: every occurrence of the key; with one: only ``key=value``). Setting a key
replaces every earlier occurrence in place — so ``key=value`` becomes a bare ``key`` in one step — and a
new key is appended. Keys ``root`` and ``kubeos.slot`` are refused: ``grub.cfg`` sets them per slot and a
second one would boot the wrong root. Values are limited to characters that neither GRUB's script
parser nor the kernel's command-line parser treat specially (no spaces, quotes, ``$``, ``\\``, ``;``,
wildcards).
"""

from __future__ import annotations

__metaclass__ = type

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ansible_collections.kubeos.os.plugins.module_utils import slots
from ansible_collections.kubeos.os.plugins.module_utils.sysconfig import models
from ansible_collections.kubeos.os.plugins.module_utils.sysconfig.models import Applied, ConfigEntry, Content

RESERVED_KEYS = ("root", "kubeos.slot")
_KEY = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
_VALUE = re.compile(r"^[A-Za-z0-9_.,:/=+@%~!\-]+$")


def variable(slot: str) -> str:
    """The GRUB environment variable that holds the extra kernel arguments of ``slot``."""
    return f"kubeos_{slot}_cmdline"


def _key_problem(key: str) -> str | None:
    if not _KEY.match(key):
        return (
            f"{key!r} is not a kernel argument name: use letters, digits, '_', '-' and '.' "
            "(a value goes into value, not into the key)"
        )
    if key in RESERVED_KEYS:
        return f"{key!r} is set by grub.cfg for each slot and cannot be changed here (a second one would boot the wrong root)"
    return None


def _value_problem(value: Any) -> str | None:
    if models.is_empty(value):
        return None
    if not models.is_word(value):
        return (
            f"the value must be a string or an integer (empty or null for a bare argument), not {models.kind_of(value)}"
        )
    text = models.word(value)
    if not _VALUE.match(text):
        bad = sorted({c for c in text if not _VALUE.match(c)})
        return (
            f"the value {text!r} contains {', '.join(repr(c) for c in bad)}: kernel arguments set here may only use "
            "letters, digits and . , : / = + @ % ~ ! - _"
        )
    return None


def check(entry: ConfigEntry) -> list[str]:
    errors = []
    if entry.configpath:
        errors.append(
            f"{entry.where}: {entry.model} has no configpath (the arguments live in the GRUB environment on BOOT); "
            "remove configpath"
        )
    for content in entry.contents:
        problem = _key_problem(content.key) or _value_problem(content.value)
        if problem:
            errors.append(content.problem(entry.model, problem))
    return errors


def _split(word: str) -> tuple[str, str | None]:
    key, sep, value = word.partition("=")
    return key, (value if sep else None)


class KernelArgs:
    """The words of one slot's ``kubeos_<slot>_cmdline``."""

    def __init__(self, text: str) -> None:
        self.words = text.split()

    def _found(self, key: str) -> list[int]:
        return [i for i, w in enumerate(self.words) if _split(w)[0] == key]

    def _shown(self, indices: list[int]) -> str | None:
        return " ".join(self.words[i] for i in indices) if indices else None

    def apply(self, content: Content) -> Applied:
        found = self._found(content.key)
        before = self._shown(found)
        if content.delete:
            if not found:
                return models.applied(content, None, None, note="not set")
            if models.is_empty(content.value):
                drop = found
            else:
                drop = [i for i in found if _split(self.words[i])[1] == models.word(content.value)]
                if not drop:
                    note = f"kept: {before!r} does not have the value {models.word(content.value)!r}"
                    return models.applied(content, before, before, note=note)
            for index in reversed(drop):
                del self.words[index]
            return models.applied(content, before, self._shown(self._found(content.key)))
        new = content.key if models.is_empty(content.value) else f"{content.key}={models.word(content.value)}"
        if found:
            self.words[found[0]] = new
            for index in reversed(found[1:]):
                del self.words[index]
        else:
            self.words.append(new)
        return models.applied(content, before, new)

    def text(self) -> str:
        return " ".join(self.words)


def env_update(env: Mapping[str, str], slot: str, args: KernelArgs) -> dict[str, str | None]:
    """The variables to set (None: unset) so that ``slot`` gets ``args``."""
    text = args.text()
    name = variable(slot)
    if not text:
        return {name: None} if name in env else {}
    return {name: text}


@dataclass
class GrubAccess:
    """The GRUB environment of the disk and which slot each grub.cmdline model addresses."""

    env: dict[str, str]
    current_slot: str
    next_slot: str
    write: Callable[[Mapping[str, str]], None]
    # Why the kernel arguments of this disk cannot be set (a disk whose grub.cfg does not read them).
    refusal: str | None = None


def grub_access(state: slots.DiskState) -> GrubAccess:
    """The kernel-argument view of a disk: ``current`` is the running slot (on a disk that is not
    running, the committed one), ``next`` the other."""
    refusal = None
    if state.layout.kind != slots.LAYOUT_KUBEOS:
        refusal = (
            f"{state.layout.disk} was laid out by KubeOS's own image builder ({state.layout.kind}): its grub.cfg "
            "does not read per-slot kernel arguments from the GRUB environment; lay the disk out with "
            "kubeos.os.disk_layout to use grub.cmdline models"
        )
    current = state.active_slot
    return GrubAccess(
        env=dict(state.grub.env),
        current_slot=current,
        next_slot=slots.other_slot(current),
        write=slots.BootEnv(state.layout).write,
        refusal=refusal,
    )
