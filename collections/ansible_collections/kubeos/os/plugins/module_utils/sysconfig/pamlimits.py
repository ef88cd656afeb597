# Copyright: kubeos contributors
# Apache License 2.0 (see LICENSE)
"""The model ``pam.limits``: lines ``<domain> <type> <item> <value>`` of ``/etc/security/limits.conf``.

KubeOS's form: ``key`` is the domain (``*``, ``root``, ``@group``, ``%group``, ``1000:2000``) and
``value`` is ``type.item.value`` (``soft.nofile.65535``). A line is identified by domain, type and item,
so a domain may have many lines (``* soft nofile`` and ``* hard nofile`` are two settings); setting one
changes that line (every line, if the file repeats it) or appends a new one aligned like the file's
last entry. ``_`` for the type or the item means "the one the file has": it must then match exactly
one line of the domain. ``_`` as the value keeps the value.

``delete`` takes ``type.item`` or ``type.item.value`` (only a line with that value is removed; ``_``
matches anything); without a value every line of the domain goes. Comments, blank lines, order and
the spacing of untouched lines are kept.
"""

from __future__ import annotations

__metaclass__ = type

import re
from dataclasses import dataclass

from ansible_collections.kubeos.os.plugins.module_utils.sysconfig import models
from ansible_collections.kubeos.os.plugins.module_utils.sysconfig.models import Applied, ConfigEntry, Content

ANY = "_"
TYPES = ("soft", "hard", "-")
ITEMS = (
    "core", "data", "fsize", "memlock", "nofile", "rss", "stack", "cpu", "nproc", "as", "maxlogins",
    "maxsyslogins", "nonewprivs", "priority", "locks", "sigpending", "msgqueue", "nice", "rtprio", "chroot",
)  # fmt: skip
_DOMAIN = re.compile(r"^[^\s#]+$")
_LIMIT = re.compile(r"^(-?[0-9]+|unlimited|infinity)$")
_LINE = re.compile(r"^(\s*)(\S+)(\s+)(\S+)(\s+)(\S+)(\s+)(\S+)(.*)$")
_ENCODING = "utf-8"
_ERRORS = "surrogateescape"


@dataclass(frozen=True)
class Wanted:
    type: str
    item: str
    value: str | None  # None: not given (delete type.item)

    def text(self) -> str:
        return ".".join(p for p in (self.type, self.item, self.value) if p is not None)


def parse_value(value: object, *, delete: bool) -> Wanted | None:
    """``type.item.value`` (for delete also ``type.item``; None for no value); ValueError says what is wrong."""
    if models.is_empty(value):
        if delete:
            return None
        raise ValueError("a value type.item.value is required, e.g. soft.nofile.65535")
    if not isinstance(value, str):
        raise ValueError(
            f"the value must be a string type.item.value (e.g. soft.nofile.65535), not {models.kind_of(value)}"
        )
    parts = value.strip().split(".")
    if len(parts) not in ((2, 3) if delete else (3,)):
        form = "type.item or type.item.value" if delete else "type.item.value"
        raise ValueError(f"the value {value!r} must be {form}, e.g. soft.nofile.65535")
    kind, item = parts[0], parts[1]
    limit = parts[2] if len(parts) == 3 else None
    if kind not in (*TYPES, ANY):
        raise ValueError(f"unknown limit type {kind!r} in {value!r}: use soft, hard, - (both) or _ (keep)")
    if item not in (*ITEMS, ANY):
        raise ValueError(f"unknown limit item {item!r} in {value!r}: use one of {', '.join(ITEMS)} or _ (keep)")
    if limit is not None and limit != ANY and not _LIMIT.match(limit):
        raise ValueError(f"the limit {limit!r} in {value!r} must be a number, unlimited, infinity or _ (keep)")
    return Wanted(kind, item, limit)


def check(entry: ConfigEntry) -> list[str]:
    errors = []
    for content in entry.contents:
        if not _DOMAIN.match(content.key):
            errors.append(
                content.problem(entry.model, "the key is the domain (*, a user, @group, %group, uid:uid): one word")
            )
            continue
        try:
            wanted = parse_value(content.value, delete=content.delete)
        except ValueError as exc:
            errors.append(content.problem(entry.model, str(exc)))
            continue
        if wanted is not None and not content.delete and ANY in (wanted.type, wanted.item) and wanted.value == ANY:
            errors.append(content.problem(entry.model, "_._._ changes nothing: give at least the new value"))
    return errors


class LimitsDocument:
    """A limits.conf-style file, edited line by line."""

    def __init__(self, data: bytes) -> None:
        self.lines: list[str] = data.decode(_ENCODING, _ERRORS).splitlines(keepends=True)

    def _matches(self, domain: str, kind: str, item: str, value: str | None) -> list[tuple[int, re.Match[str]]]:
        found = []
        for index, line in enumerate(self.lines):
            if line.strip().startswith("#"):
                continue
            match = _LINE.match(line.rstrip("\r\n"))
            if not match or match.group(2) != domain:
                continue
            if kind != ANY and match.group(4) != kind:
                continue
            if item != ANY and match.group(6) != item:
                continue
            if value not in (None, ANY) and match.group(8) != value:
                continue
            found.append((index, match))
        return found

    @staticmethod
    def _shown(matches: list[tuple[int, re.Match[str]]]) -> str | None:
        if not matches:
            return None
        return ", ".join(".".join(m.group(g) for g in (4, 6, 8)) for _i, m in matches)

    def _template(self) -> re.Match[str] | None:
        for line in reversed(self.lines):
            if line.strip().startswith("#"):
                continue
            match = _LINE.match(line.rstrip("\r\n"))
            if match:
                return match
        return None

    def _new_line(self, fields: tuple[str, str, str, str]) -> str:
        template = self._template()
        if template is None:
            return " ".join(fields) + "\n"
        out = template.group(1)
        widths = [
            template.group(2) + template.group(3),
            template.group(4) + template.group(5),
            template.group(6) + template.group(7),
        ]
        for field, width in zip(fields[:3], widths):
            out += field + " " * max(1, len(width) - len(field))
        return out + fields[3] + "\n"

    def apply(self, content: Content) -> Applied:
        domain = content.key
        wanted = parse_value(content.value, delete=content.delete)
        if content.delete:
            found = (
                self._matches(domain, ANY, ANY, None)
                if wanted is None
                else self._matches(domain, wanted.type, wanted.item, wanted.value)
            )
            before = self._shown(found)
            if not found:
                return models.applied(content, None, None, note="no such line")
            for index, _match in reversed(found):
                del self.lines[index]
            return models.applied(content, before, None)
        if wanted is None or wanted.value is None:  # pragma: no cover - parse_value requires it for a set
            raise models.SysconfigError(content.problem(models.PAM_LIMITS, "a value type.item.value is required"))
        found = self._matches(domain, wanted.type, wanted.item, None)
        wildcard = ANY in (wanted.type, wanted.item)
        if wildcard and len(found) != 1:
            raise models.SysconfigError(
                content.problem(
                    models.PAM_LIMITS,
                    f"{wanted.text()!r} must match exactly one line of domain {domain!r} but matches {len(found)}"
                    f"{' (' + str(self._shown(found)) + ')' if found else ''}; name the type and item",
                )
            )
        before = self._shown(found)
        if not found:
            if wanted.value == ANY:
                raise models.SysconfigError(
                    content.problem(
                        models.PAM_LIMITS,
                        f"no line {domain} {wanted.type} {wanted.item} to keep the value of; give the value",
                    )
                )
            if self.lines and not self.lines[-1].endswith("\n"):
                self.lines[-1] += "\n"
            self.lines.append(self._new_line((domain, wanted.type, wanted.item, wanted.value)))
            return models.applied(content, None, wanted.text())
        for index, match in found:
            groups = list(match.groups())
            for group, new in ((3, wanted.type), (5, wanted.item), (7, wanted.value)):
                if new != ANY:
                    groups[group] = new
            ending = self.lines[index][len(self.lines[index].rstrip("\r\n")) :]
            self.lines[index] = "".join(groups) + ending
        updated = []
        for index, _match in found:
            now = _LINE.match(self.lines[index].rstrip("\r\n"))
            if now:
                updated.append((index, now))
        return models.applied(content, before, self._shown(updated))

    def render(self) -> bytes:
        return "".join(self.lines).encode(_ENCODING, _ERRORS)
