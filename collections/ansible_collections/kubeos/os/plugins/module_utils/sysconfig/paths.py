# Copyright: kubeos contributors
# Apache License 2.0 (see LICENSE)
"""Where each file model may write: its default ``configpath`` and the places a ``configpath`` may name.

A ``configpath`` is an absolute, normalised path (no ``..``, no ``//``, no trailing ``/``) inside the
model's allowed places. It is resolved inside ``root`` (a directory treated as ``/``): symbolic links are
followed within the tree, absolute ones relative to ``root``, and the place the link leads to must be
allowed too. So neither ``../`` nor a link can make a model write outside its own files, nor outside
``root``.
"""

from __future__ import annotations

__metaclass__ = type

import os
import posixpath
import stat
from dataclasses import dataclass

from ansible_collections.kubeos.os.plugins.module_utils import rootpath
from ansible_collections.kubeos.os.plugins.module_utils.sysconfig import models

MAX_LINKS = 40


@dataclass(frozen=True)
class Places:
    default: str
    files: tuple[str, ...]  # exact files
    dirs: tuple[str, ...]  # any file below these directories

    def describe(self) -> str:
        return ", ".join([*self.files, *(f"{d}/…" for d in self.dirs)])

    def allows(self, path: str) -> bool:
        return path in self.files or any(path.startswith(d + "/") for d in self.dirs)


PLACES = {
    models.KERNEL_SYSCTL_PERSIST: Places("/etc/sysctl.conf", ("/etc/sysctl.conf",), ("/etc/sysctl.d",)),
    models.KUBERNETES_KUBELET: Places("/var/lib/kubelet/config.yaml", (), ("/var/lib/kubelet", "/etc/kubernetes")),
    models.CONTAINER_CONTAINERD: Places("/etc/containerd/config.toml", (), ("/etc/containerd",)),
    models.PAM_LIMITS: Places("/etc/security/limits.conf", ("/etc/security/limits.conf",), ("/etc/security/limits.d",)),
}


@dataclass(frozen=True)
class Target:
    """A file a model writes: as the node sees it (``path``) and where it is here (``host_path``)."""

    path: str  # absolute, inside root, links resolved
    host_path: str  # root joined with path
    exists: bool


class PathError(ValueError):
    """A configpath that may not be used; the message says why and what is allowed."""


def check_configpath(model: str, configpath: str) -> str:
    """The path a file model writes (``configpath`` or the default), checked lexically."""
    places = PLACES[model]
    path = configpath or places.default
    if not path.startswith("/"):
        raise PathError(f"configpath {path!r} must be an absolute path; {model} may write {places.describe()}")
    if "\0" in path:
        raise PathError(f"configpath {path!r} contains a NUL byte")
    parts = path.split("/")[1:]
    if ".." in parts or "." in parts:
        raise PathError(f"configpath {path!r} must not contain '.' or '..' parts (no path traversal)")
    if posixpath.normpath(path) != path:
        raise PathError(f"configpath {path!r} is not normalised: write {posixpath.normpath(path)!r}")
    if not places.allows(path):
        raise PathError(f"configpath {path!r} is outside what {model} may write: {places.describe()}")
    return path


def resolve_in_root(root: str, path: str) -> str:
    """``path`` with symbolic links inside the tree at ``root`` resolved; the result is absolute, relative
    to ``root``. Parts that do not exist are kept as they are."""
    try:
        return rootpath.resolve(root, path, MAX_LINKS)
    except rootpath.LinkLoopError as exc:
        raise PathError(str(exc)) from exc


def target(root: str, model: str, configpath: str) -> Target:
    """The file ``model`` writes for ``configpath`` under ``root``; PathError when it may not."""
    path = check_configpath(model, configpath)
    real = resolve_in_root(root, path)
    places = PLACES[model]
    if real != path and not places.allows(real):
        raise PathError(
            f"configpath {path!r} is a symbolic link to {real!r}, outside what {model} may write: {places.describe()}"
        )
    host = os.path.join(root, real.lstrip("/"))
    try:
        st = os.stat(host)
    except FileNotFoundError:
        parent = os.path.dirname(host)
        if not os.path.isdir(parent):
            raise PathError(
                f"the directory {posixpath.dirname(real)!r} of configpath {path!r} does not exist; create it first"
            ) from None
        return Target(path=real, host_path=host, exists=False)
    if not stat.S_ISREG(st.st_mode):
        raise PathError(f"configpath {path!r} is not a regular file")
    return Target(path=real, host_path=host, exists=True)
