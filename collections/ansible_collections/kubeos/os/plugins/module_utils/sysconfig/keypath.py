# Copyright: kubeos contributors
# Apache License 2.0 (see LICENSE)
"""Dotted key paths into YAML and TOML documents, as KubeOS writes them.

``authentication.anonymous.enabled`` walks three mappings. A part that itself contains dots is quoted,
with double or single quotes: ``evictionHard."memory.available"``,
``plugins."io.containerd.grpc.v1.cri".sandbox_image``. Inside quotes everything but the closing quote
is taken as is (no escapes). Empty parts (``a..b``, a leading or trailing dot), an unclosed quote and
text right after a closing quote are errors.
"""

from __future__ import annotations

__metaclass__ = type

QUOTES = ('"', "'")


class KeyPathError(ValueError):
    """A malformed key path; the message says where."""


def parse(path: str) -> list[str]:
    """The parts of a dotted key path."""
    parts: list[str] = []
    pos = 0
    end = len(path)
    if not path:
        raise KeyPathError("the key path is empty")
    while True:
        if pos >= end:
            raise KeyPathError(f"key path {path!r} ends with a dot: remove it, or quote a part that holds dots")
        char = path[pos]
        if char in QUOTES:
            close = path.find(char, pos + 1)
            if close < 0:
                raise KeyPathError(f"key path {path!r} has an unclosed {char} quote at position {pos}")
            part = path[pos + 1 : close]
            if not part:
                raise KeyPathError(f"key path {path!r} has an empty quoted part at position {pos}")
            pos = close + 1
            if pos < end and path[pos] != ".":
                raise KeyPathError(
                    f"key path {path!r}: a quoted part must be followed by a dot or end the path (position {pos})"
                )
        else:
            dot = path.find(".", pos)
            stop = end if dot < 0 else dot
            part = path[pos:stop]
            if not part:
                raise KeyPathError(
                    f"key path {path!r} has an empty part at position {pos}: "
                    "write parts separated by single dots, and quote a part that holds dots"
                )
            for quote in QUOTES:
                if quote in part:
                    raise KeyPathError(
                        f"key path {path!r}: a quote may only start a part (found {quote} inside {part!r})"
                    )
            if part != part.strip():
                raise KeyPathError(f"key path {path!r}: part {part!r} has leading or trailing spaces; quote it")
            pos = stop
        parts.append(part)
        if pos >= end:
            return parts
        pos += 1  # the dot


def render(parts: list[str]) -> str:
    """The dotted form of ``parts``, quoting those that need it."""
    out = []
    for part in parts:
        if "." in part or part != part.strip() or any(q in part for q in QUOTES) or not part:
            quote = "'" if '"' in part else '"'
            out.append(f"{quote}{part}{quote}")
        else:
            out.append(part)
    return ".".join(out)
