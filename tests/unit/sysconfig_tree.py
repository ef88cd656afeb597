"""Helpers of the kubeos.os.sysconfig tests: a node tree in a temporary directory, its fingerprint, and the
plan/apply cycle of the module without Ansible around it."""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ansible_collections.kubeos.os.plugins.module_utils.sysconfig import cmdline, plan, transaction


def put(root: Path, path: str, text: str, mode: int = 0o644) -> Path:
    """Write ``text`` to ``root``/``path`` (parents created)."""
    target = root / path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    target.chmod(mode)
    return target


def read(root: Path, path: str) -> str:
    return (root / path.lstrip("/")).read_text()


def fingerprint(root: Path) -> dict[str, tuple[Any, ...]]:
    """Every entry under ``root``: kind, mode, owner and content hash (or link target)."""
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            rel = os.path.relpath(path, root)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)
            else:
                digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
                out[rel] = ("file", stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, digest)
    return out


@dataclass
class FakeBootEnv:
    """A GRUB environment kept in memory, with the slots a disk would report."""

    env: dict[str, str] = field(default_factory=dict)
    current: str = "A"
    writes: list[dict[str, str]] = field(default_factory=list)
    fail_writes: bool = False

    def write(self, env: Mapping[str, str]) -> None:
        if self.fail_writes:
            raise OSError(5, "Input/output error (simulated)")
        self.env = dict(env)
        self.writes.append(dict(env))

    def access(self) -> cmdline.GrubAccess:
        return cmdline.GrubAccess(
            env=dict(self.env),
            current_slot=self.current,
            next_slot="B" if self.current == "A" else "A",
            write=self.write,
        )


def configure(
    root: Path, configs: list[dict[str, Any]], *, grub: FakeBootEnv | None = None, check: bool = False
) -> plan.Plan:
    """What the module does: parse, check, plan against the tree, and (unless ``check``) write."""
    entries = plan.parse(configs)
    result = plan.build(entries, str(root), grub.access() if grub is not None else None)
    if not check:
        transaction.apply_all(result.changes)
    return result


def contents(result: plan.Plan, index: int = 0) -> list[dict[str, Any]]:
    """The per-content results of entry ``index``."""
    return [a.to_dict() for a in result.entries[index].applied]
