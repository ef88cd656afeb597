# Copyright: kubeos contributors
# Apache License 2.0 (see LICENSE)
"""The model ``container.containerd``: dotted key paths into containerd's TOML configuration.

``plugins."io.containerd.grpc.v1.cri".sandbox_image`` walks the tables ``plugins`` and
``io.containerd.grpc.v1.cri`` (quoted: the name holds dots). The file is edited with tomlkit, which
keeps comments, order and formatting of everything that is not changed; a new key takes the
indentation of its neighbours. TOML has no null: a null anywhere in a value is refused.
"""

from __future__ import annotations

__metaclass__ = type

import traceback
from typing import Any

from ansible_collections.kubeos.os.plugins.module_utils.sysconfig import keypath, models, treeedit
from ansible_collections.kubeos.os.plugins.module_utils.sysconfig.models import Applied, ConfigEntry, Content

try:
    import tomlkit
    from tomlkit.exceptions import TOMLKitError
    from tomlkit.items import AoT, Table

    HAS_TOMLKIT = True
    TOMLKIT_IMPORT_ERROR = ""
except ImportError:  # pragma: no cover - depends on the target host
    HAS_TOMLKIT = False
    TOMLKIT_IMPORT_ERROR = traceback.format_exc()

LIBRARY = "tomlkit"


def _has_null(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, dict):
        return any(_has_null(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_has_null(v) for v in value)
    return False


def check(entry: ConfigEntry) -> list[str]:
    errors = []
    for content in entry.contents:
        try:
            keypath.parse(content.key)
        except keypath.KeyPathError as exc:
            errors.append(content.problem(entry.model, str(exc)))
            continue
        if content.delete:
            if content.value is not None and not isinstance(content.value, list):
                errors.append(
                    content.problem(entry.model, "delete takes no value (or a list of items to remove from a list)")
                )
            continue
        if _has_null(content.value):
            errors.append(
                content.problem(
                    entry.model, "TOML has no null: give a value, or use operation delete to remove the key"
                )
            )
    return errors


def _new_table() -> Any:
    try:
        return tomlkit.table(is_super_table=True)
    except TypeError:  # pragma: no cover - tomlkit before 0.11.5
        return tomlkit.table()


def _to_toml(value: Any) -> Any:
    return tomlkit.item(value)


def _indent_like_neighbours(holder: Any, key: str) -> None:
    """Give a new ``key = value`` the indentation of the other keys of its table."""
    if not isinstance(holder, Table):
        return
    body = holder.value.body
    indent = None
    for name, item in body:
        if name is None or str(name) == key or isinstance(item, (Table, AoT)):
            continue
        indent = item.trivia.indent
        break
    if indent is None:
        return
    new = holder.value.item(key)
    trivia = getattr(new, "trivia", None)
    if trivia is not None and not isinstance(new, (Table, AoT)):
        trivia.indent = indent


class TomlDocument:
    """A containerd configuration file, parsed for round-trip editing."""

    def __init__(self, data: bytes, path: str) -> None:
        if not HAS_TOMLKIT:
            raise models.SysconfigError(
                f"editing {path} (container.containerd) needs the Python library {LIBRARY} on this host"
            )
        self.path = path
        try:
            self.original = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise models.SysconfigError(f"{path} is not UTF-8 text ({exc}); fix or remove it") from None
        try:
            self.doc = tomlkit.parse(self.original)
        except TOMLKitError as exc:
            raise models.SysconfigError(f"{path} is not valid TOML: {exc}; fix the file first") from None

    def apply(self, content: Content) -> Applied:
        try:
            return treeedit.apply(
                self.doc,
                content,
                make_mapping=_new_table,
                convert=_to_toml,
                after_insert=_indent_like_neighbours,
            )
        except (treeedit.TreeError, TOMLKitError) as exc:
            raise models.SysconfigError(
                f"{content.where} ({models.CONTAINER_CONTAINERD} {content.key!r}): {exc}"
            ) from None

    def render(self) -> bytes:
        return tomlkit.dumps(self.doc).encode("utf-8")
