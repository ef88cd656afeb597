# Copyright: kubeos contributors
# Apache License 2.0 (see LICENSE)
"""Setting and deleting values at dotted key paths in a parsed YAML or TOML document.

Shared by ``kubernetes.kubelet`` (ruamel.yaml) and ``container.containerd`` (tomlkit); the format
modules say how to make a new mapping and how to turn a JSON value into a value of their format.

Rules (KubeOS's, made idempotent): a missing mapping on the way is created; a path through something
that is not a mapping is an error. Setting a key that holds a list appends the given list's items
that the list does not hold yet (so a second run changes nothing); a list is replaced by deleting it
first, then setting it. ``delete`` removes the key; with a list value on a list it removes just those
items.
"""

from __future__ import annotations

__metaclass__ = type

import datetime
from collections.abc import Callable, MutableMapping
from typing import Any

from ansible_collections.kubeos.os.plugins.module_utils.sysconfig import keypath, models
from ansible_collections.kubeos.os.plugins.module_utils.sysconfig.models import Applied, Content


def plain(value: Any) -> Any:
    """A parsed value as plain JSON-like Python (mappings, lists, str, int, float, bool, None)."""
    unwrap = getattr(value, "unwrap", None)
    if callable(unwrap) and not isinstance(value, (str, bytes)):
        value = unwrap()
    if isinstance(value, (MutableMapping, dict)):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if value is None or isinstance(value, bool):
        return value
    if type(value).__name__ == "ScalarBoolean":  # ruamel.yaml's anchored booleans are ints
        return bool(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    return str(value)


class TreeError(ValueError):
    pass


def _is_mapping(value: Any) -> bool:
    return isinstance(value, (dict, MutableMapping))


def _walk(root: Any, parts: list[str], make_mapping: Callable[[], Any] | None) -> tuple[Any, bool]:
    """The mapping that holds ``parts[-1]`` (created on the way when ``make_mapping`` is given).
    Returns (mapping or None when missing and not created, whether mappings were created)."""
    node = root
    created = False
    for depth, part in enumerate(parts[:-1]):
        if part in node:
            child = node[part]
            if not _is_mapping(child):
                where = keypath.render(parts[: depth + 1])
                raise TreeError(
                    f"{where} is {models.kind_of(plain(child))}, not a mapping, so it cannot hold "
                    f"{keypath.render(parts[depth + 1 :])}"
                )
        else:
            if make_mapping is None:
                return None, created
            child = make_mapping()
            node[part] = child
            child = node[part]
            created = True
        node = child
    return node, created


def apply(
    root: Any,
    content: Content,
    *,
    make_mapping: Callable[[], Any],
    convert: Callable[[Any], Any],
    after_insert: Callable[[Any, str], None] | None = None,
) -> Applied:
    """Apply ``content`` to the document ``root``; TreeError for a path that cannot be followed."""
    try:
        parts = keypath.parse(content.key)
    except keypath.KeyPathError as exc:
        raise TreeError(str(exc)) from None
    last = parts[-1]
    if content.delete:
        holder, _created = _walk(root, parts, None)
        if holder is None or last not in holder:
            return models.applied(content, None, None, note="not present")
        before = plain(holder[last])
        if isinstance(before, list) and isinstance(content.value, list) and content.value:
            current = holder[last]
            drop = [i for i, item in enumerate(before) if any(models.same(item, v) for v in content.value)]
            for index in reversed(drop):
                del current[index]
            after = plain(current)
            note = "" if drop else "none of the given items is in the list"
            return models.applied(content, before, after, note=note)
        del holder[last]
        return models.applied(content, before, None)
    holder, _created = _walk(root, parts, make_mapping)
    if last in holder:
        existing = holder[last]
        before = plain(existing)
        if isinstance(before, list):
            if not isinstance(content.value, list):
                raise TreeError(
                    f"{content.key} is a list: give a list of items to append "
                    f"(to replace the list, delete {content.key} first, then set it)"
                )
            for item in content.value:
                if not any(models.same(item, have) for have in plain(existing)):
                    existing.append(convert(item))
            return models.applied(content, before, plain(existing))
        if models.same(before, content.value):
            return models.applied(content, before, before)
        holder[last] = convert(content.value)
        return models.applied(content, before, plain(holder[last]))
    holder[last] = convert(content.value)
    if after_insert is not None:
        after_insert(holder, last)
    result = models.applied(content, None, plain(holder[last]), note="added")
    result.changed = True  # also when the new value is null
    return result
