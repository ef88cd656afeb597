# Copyright: kubeos contributors
# Apache License 2.0 (see LICENSE)
"""The model ``kubernetes.kubelet``: dotted key paths into the kubelet's YAML configuration.

The file is read and written with ruamel.yaml's round-trip mode, which keeps comments, key order and
quoting; the indentation is guessed from the file. Where ruamel.yaml would still reformat parts that
were not changed (mixed indentation, aligned comments), only the lines that changed are patched into the
original text, and the patched text is accepted only when it parses to exactly the intended data
(otherwise ruamel.yaml's rendering of the whole file is written, which holds the same data).
"""

from __future__ import annotations

__metaclass__ = type

import difflib
import io
import re
import traceback
from typing import Any

from ansible_collections.kubeos.os.plugins.module_utils.sysconfig import keypath, models, treeedit
from ansible_collections.kubeos.os.plugins.module_utils.sysconfig.models import Applied, ConfigEntry, Content

try:
    from ruamel.yaml import YAML
    from ruamel.yaml.comments import CommentedMap, CommentedSeq
    from ruamel.yaml.error import YAMLError
    from ruamel.yaml.util import load_yaml_guess_indent

    HAS_RUAMEL = True
    RUAMEL_IMPORT_ERROR = ""
except ImportError:  # pragma: no cover - depends on the target host
    HAS_RUAMEL = False
    RUAMEL_IMPORT_ERROR = traceback.format_exc()

LIBRARY = "ruamel.yaml"
_START = re.compile(r"^---(\s|$)")


def check(entry: ConfigEntry) -> list[str]:
    errors = []
    for content in entry.contents:
        try:
            keypath.parse(content.key)
        except keypath.KeyPathError as exc:
            errors.append(content.problem(entry.model, str(exc)))
    return errors


def _to_yaml(value: Any) -> Any:
    if isinstance(value, dict):
        out = CommentedMap()
        for key, item in value.items():
            out[key] = _to_yaml(item)
        return out
    if isinstance(value, (list, tuple)):
        return CommentedSeq(_to_yaml(item) for item in value)
    return value


def _explicit_start(text: str) -> bool:
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        return bool(_START.match(stripped))
    return False


def _patch(original: str, before: str, after: str) -> str | None:
    """``original`` with the line changes between ``before`` and ``after`` applied, or None when a changed
    line of ``before`` has no counterpart in ``original``."""
    orig = original.splitlines(keepends=True)
    old = before.splitlines(keepends=True)
    new = after.splitlines(keepends=True)
    mapping: dict[int, int] = {}
    for a, b, size in difflib.SequenceMatcher(None, orig, old, autojunk=False).get_matching_blocks():
        for k in range(size):
            mapping[b + k] = a + k
    edits: list[tuple[int, int, list[str]]] = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, old, new, autojunk=False).get_opcodes():
        if tag == "equal":
            continue
        if i1 < i2:
            if any(i not in mapping for i in range(i1, i2)):
                return None
            start, stop = mapping[i1], mapping[i2 - 1] + 1
            if stop - start != i2 - i1:
                return None
        elif i1 > 0 and (i1 - 1) in mapping:
            start = stop = mapping[i1 - 1] + 1
        elif i1 < len(old) and i1 in mapping:
            start = stop = mapping[i1]
        else:
            return None
        edits.append((start, stop, new[j1:j2]))
    for start, stop, lines in reversed(edits):
        if start > 0 and not orig[start - 1].endswith("\n"):
            orig[start - 1] += "\n"
        orig[start:stop] = lines
    return "".join(orig)


class YamlDocument:
    """A kubelet configuration file, parsed for round-trip editing."""

    def __init__(self, data: bytes, path: str) -> None:
        if not HAS_RUAMEL:
            raise models.SysconfigError(
                f"editing {path} (kubernetes.kubelet) needs the Python library {LIBRARY} on this host"
            )
        self.path = path
        try:
            self.original = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise models.SysconfigError(f"{path} is not UTF-8 text ({exc}); fix or remove it") from None
        indent, sequence_offset = 2, 0
        if self.original.strip():
            try:
                _data, guessed, offset = load_yaml_guess_indent(self.original)
                indent = guessed or 2
                sequence_offset = offset or 0
            except YAMLError:
                pass  # the real load below reports it
        self.yaml = self._make_yaml(indent, sequence_offset, _explicit_start(self.original))
        self.data = self._load(self.original)
        self.rendered_before = self._dump(self.data)

    @staticmethod
    def _make_yaml(indent: int, sequence_offset: int, explicit_start: bool) -> Any:
        yaml = YAML(typ="rt")
        yaml.preserve_quotes = True
        yaml.width = 4096  # never re-wrap long values
        yaml.indent(mapping=indent, sequence=indent, offset=sequence_offset)
        yaml.explicit_start = explicit_start
        return yaml

    def _load(self, text: str) -> Any:
        try:
            data = self.yaml.load(text) if text.strip() else None
        except YAMLError as exc:
            raise models.SysconfigError(f"{self.path} is not valid YAML: {exc}; fix the file first") from None
        if data is None:
            return CommentedMap()
        if not isinstance(data, CommentedMap):
            raise models.SysconfigError(
                f"{self.path} must hold a YAML mapping (a kubelet configuration), not {models.kind_of(treeedit.plain(data))}"
            )
        return data

    def _dump(self, data: Any) -> str:
        if not data and not self.original.strip():
            return ""
        stream = io.StringIO()
        self.yaml.dump(data, stream)
        return stream.getvalue()

    def apply(self, content: Content) -> Applied:
        try:
            return treeedit.apply(self.data, content, make_mapping=CommentedMap, convert=_to_yaml)
        except treeedit.TreeError as exc:
            raise models.SysconfigError(
                f"{content.where} ({models.KUBERNETES_KUBELET} {content.key!r}): {exc}"
            ) from None

    def render(self) -> bytes:
        text = self._dump(self.data)
        if text == self.rendered_before:
            return self.original.encode("utf-8")
        if self.rendered_before != self.original:
            patched = _patch(self.original, self.rendered_before, text)
            if patched is not None and self._same_data(patched, text):
                text = patched
        return text.encode("utf-8")

    def _same_data(self, a: str, b: str) -> bool:
        try:
            loaded_a = self.yaml.load(a)
            loaded_b = self.yaml.load(b)
        except YAMLError:
            return False
        return models.same(treeedit.plain(loaded_a), treeedit.plain(loaded_b))
