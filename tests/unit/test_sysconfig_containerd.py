"""container.containerd: dotted key paths into containerd's TOML, comments and formatting kept (tomlkit)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest
from sysconfig_tree import configure, contents, fingerprint, put, read

from ansible_collections.kubeos.os.plugins.module_utils.sysconfig import models

PATH = "/etc/containerd/config.toml"
CONTAINERD = """\
# containerd configuration (kubeos test)
version = 2
root = "/var/lib/containerd"  # where images live

[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image = "registry.k8s.io/pause:3.8"   # the pause image
    [plugins."io.containerd.grpc.v1.cri".containerd]
      snapshotter = "overlayfs"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false

[plugins."io.containerd.grpc.v1.cri".registry]
  config_path = ""
  mirrors = ["https://a.example"]
"""
CRI = 'plugins."io.containerd.grpc.v1.cri"'


def containerd(*items: dict[str, Any], configpath: str = "") -> list[dict[str, Any]]:
    return [{"model": "container.containerd", "configpath": configpath, "contents": list(items)}]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    put(root, PATH, CONTAINERD)
    return root


def data(root: Path) -> dict[str, Any]:
    return tomllib.loads(read(root, PATH))


def test_update_changes_only_the_value(root: Path) -> None:
    result = configure(
        root,
        containerd(
            {"key": f"{CRI}.sandbox_image", "value": "registry.k8s.io/pause:3.9"},
            {"key": f"{CRI}.containerd.runtimes.runc.options.SystemdCgroup", "value": True},
        ),
    )
    assert read(root, PATH) == CONTAINERD.replace("pause:3.8", "pause:3.9").replace(
        "SystemdCgroup = false", "SystemdCgroup = true"
    )
    assert contents(result)[1] == {
        "key": f"{CRI}.containerd.runtimes.runc.options.SystemdCgroup",
        "operation": "set",
        "before": False,
        "after": True,
        "changed": True,
    }


def test_new_keys_take_the_indentation_of_their_table(root: Path) -> None:
    configure(root, containerd({"key": f"{CRI}.containerd.default_runtime_name", "value": "runc"}))
    text = read(root, PATH)
    assert '      snapshotter = "overlayfs"\n      default_runtime_name = "runc"\n' in text
    assert data(root)["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["default_runtime_name"] == "runc"
    assert "# the pause image" in text and "# where images live" in text


def test_new_tables_are_created(root: Path) -> None:
    configure(
        root, containerd({"key": "metrics.address", "value": "127.0.0.1:1338"}, {"key": "debug.level", "value": "info"})
    )
    got = data(root)
    assert got["metrics"] == {"address": "127.0.0.1:1338"} and got["debug"] == {"level": "info"}
    assert read(root, PATH).startswith(CONTAINERD)


def test_arrays_are_appended_without_repeating_items_and_items_deleted(root: Path) -> None:
    key = f"{CRI}.registry.mirrors"
    configs = containerd({"key": key, "value": ["https://b.example", "https://a.example"]})
    configure(root, configs)
    assert data(root)["plugins"]["io.containerd.grpc.v1.cri"]["registry"]["mirrors"] == [
        "https://a.example",
        "https://b.example",
    ]
    assert not configure(root, configs).changed
    configure(root, containerd({"key": key, "value": ["https://a.example"], "operation": "delete"}))
    assert data(root)["plugins"]["io.containerd.grpc.v1.cri"]["registry"]["mirrors"] == ["https://b.example"]


def test_delete_a_key(root: Path) -> None:
    result = configure(
        root, containerd({"key": "root", "operation": "delete"}, {"key": "nope.x", "operation": "delete"})
    )
    assert "root =" not in read(root, PATH) and read(root, PATH).startswith("# containerd configuration")
    assert [c["changed"] for c in contents(result)] == [True, False]


def test_numbers_and_strings_stay_apart_and_runs_are_idempotent(root: Path) -> None:
    configs = containerd(
        {"key": "version", "value": 2}, {"key": "oom_score", "value": -999}, {"key": "x.f", "value": 1.5}
    )
    first = configure(root, configs)
    assert [c["changed"] for c in contents(first)] == [False, True, True]
    after = fingerprint(root)
    assert not configure(root, configs).changed and fingerprint(root) == after
    assert configure(root, containerd({"key": "version", "value": "2"})).changed
    assert data(root)["version"] == "2"


def test_a_path_through_a_value_is_refused(root: Path) -> None:
    before = fingerprint(root)
    with pytest.raises(models.SysconfigError, match="root is a string, not a mapping"):
        configure(root, containerd({"key": "version", "value": 3}, {"key": "root.sub", "value": 1}))
    assert fingerprint(root) == before


def test_missing_file_is_created(root: Path) -> None:
    configure(root, containerd({"key": "version", "value": 2}, configpath="/etc/containerd/extra.toml"))
    assert read(root, "/etc/containerd/extra.toml") == "version = 2\n"
