"""Service actions after a change: only when asked for, only for what changed, never for a tree that is not running."""

from __future__ import annotations

from pathlib import Path

import pytest
from sysconfig_tree import configure, put

from ansible_collections.kubeos.os.plugins.module_utils.sysconfig import models, services

FLAGS = {"reload_sysctl": True, "restart_kubelet": True, "restart_containerd": True}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    put(tmp_path, "/etc/sysctl.conf", "a.b = 1\n")
    put(tmp_path, "/etc/sysctl.d/90-x.conf", "c.d = 1\n")
    put(tmp_path, "/var/lib/kubelet/config.yaml", "maxPods: 110\n")
    put(tmp_path, "/etc/containerd/config.toml", "version = 2\n")
    return tmp_path


def test_actions_follow_what_changed(root: Path) -> None:
    result = configure(
        root,
        [
            {"model": "kernel.sysctl.persist", "contents": [{"key": "a.b", "value": 2}]},
            {"model": "kernel.sysctl.persist", "configpath": "/etc/sysctl.d/90-x.conf", "contents": [{"key": "c.d", "value": 1}]},
            {"model": "kubernetes.kubelet", "contents": [{"key": "maxPods", "value": 120}]},
            {"model": "container.containerd", "contents": [{"key": "version", "value": 2}]},
        ],
        check=True,
    )  # fmt: skip
    assert [a.describe() for a in services.actions(result, **FLAGS)] == [
        "sysctl -p /etc/sysctl.conf",
        "systemctl restart kubelet.service",
    ]
    off = dict.fromkeys(FLAGS, False)
    assert services.actions(result, **off) == []


def test_actions_are_refused_for_another_root() -> None:
    services.check("/", **FLAGS)
    services.check("/mnt/image", reload_sysctl=False, restart_kubelet=False, restart_containerd=False)
    with pytest.raises(models.SysconfigError, match="reload_sysctl, restart_containerd act on the running system"):
        services.check("/mnt/image", reload_sysctl=True, restart_kubelet=False, restart_containerd=True)
