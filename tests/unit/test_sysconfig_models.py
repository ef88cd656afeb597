"""kubeos.os.sysconfig: what is refused before anything is touched, and the all-or-nothing write."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from sysconfig_tree import FakeBootEnv, configure, fingerprint, put, read

from ansible_collections.kubeos.os.plugins.module_utils import atomicfile
from ansible_collections.kubeos.os.plugins.module_utils.sysconfig import (
    keypath,
    models,
    paths,
    transaction,
)


@pytest.fixture
def node(tmp_path: Path) -> Path:
    """A small node tree with a file for every file model and one sysctl."""
    root = tmp_path / "root"
    put(root, "/etc/sysctl.conf", "# boot settings\nvm.swappiness = 60\n")
    put(root, "/etc/sysctl.d/.keep", "")
    put(root, "/proc/sys/net/ipv4/ip_forward", "0\n")
    put(root, "/var/lib/kubelet/config.yaml", "# kubelet\nkind: KubeletConfiguration\nmaxPods: 110\n")
    put(
        root,
        "/etc/containerd/config.toml",
        'version = 2\n[plugins."io.containerd.grpc.v1.cri"]\n  sandbox_image = "pause:3.8"\n',
    )
    put(root, "/etc/security/limits.conf", "# limits\n*    soft    nofile    1024\n")
    put(root, "/etc/containerd/broken.toml", "a = [\n")
    put(root, "/etc/kubernetes/list.yaml", "- a\n- b\n")
    return root


GOOD = [
    {"model": "kernel.sysctl", "contents": [{"key": "net.ipv4.ip_forward", "value": 1}]},
    {"model": "kernel.sysctl.persist", "contents": [{"key": "vm.swappiness", "value": 10}]},
    {"model": "kubernetes.kubelet", "contents": [{"key": "maxPods", "value": 200}]},
    {"model": "container.containerd", "contents": [{"key": 'plugins."io.containerd.grpc.v1.cri".sandbox_image', "value": "pause:3.9"}]},
    {"model": "pam.limits", "contents": [{"key": "*", "value": "soft.nofile.65535"}]},
]  # fmt: skip


def with_bad(index: int, entry: dict[str, Any]) -> list[dict[str, Any]]:
    """The good configs with a bad entry inserted at ``index``: nothing of the good ones may be applied."""
    configs = [dict(c) for c in GOOD]
    configs.insert(index, entry)
    return configs


BAD: list[tuple[str, dict[str, Any], str]] = [
    ("unknown model", {"model": "kernel.modules", "contents": []}, "unknown model 'kernel.modules'"),
    ("unknown entry field", {"model": "pam.limits", "path": "/x"}, "unknown field(s) path"),
    ("contents not a list", {"model": "pam.limits", "contents": {"key": "*"}}, "contents must be a list"),
    ("content without key", {"model": "kernel.sysctl", "contents": [{"value": 1}]}, "key is required"),
    ("unknown operation", {"model": "kernel.sysctl.persist", "contents": [{"key": "a.b", "value": 1, "operation": "remove"}]}, "unknown operation 'remove'"),
    ("malformed sysctl key", {"model": "kernel.sysctl", "contents": [{"key": "net..ipv4", "value": 1}]}, "is not a sysctl key"),
    ("sysctl key traversal", {"model": "kernel.sysctl", "contents": [{"key": "../../etc/passwd", "value": 1}]}, "is not a sysctl key"),
    ("sysctl value a mapping", {"model": "kernel.sysctl.persist", "contents": [{"key": "a.b", "value": {"x": 1}}]}, "must be a string, an integer"),
    ("sysctl value a boolean", {"model": "kernel.sysctl", "contents": [{"key": "net.ipv4.ip_forward", "value": True}]}, "not a boolean"),
    ("sysctl value missing", {"model": "kernel.sysctl.persist", "contents": [{"key": "a.b"}]}, "a value is required"),
    ("sysctl value two lines", {"model": "kernel.sysctl.persist", "contents": [{"key": "a.b", "value": "1\nx.y = 2"}]}, "on one line"),
    ("runtime sysctl delete", {"model": "kernel.sysctl", "contents": [{"key": "net.ipv4.ip_forward", "operation": "delete"}]}, "cannot be deleted"),
    ("runtime sysctl with configpath", {"model": "kernel.sysctl", "configpath": "/etc/x", "contents": []}, "has no configpath"),
    ("kernel arg with a space", {"model": "grub.cmdline.next", "contents": [{"key": "a", "value": "x y"}]}, "contains ' '"),
    ("kernel arg with $", {"model": "grub.cmdline.next", "contents": [{"key": "a", "value": "$x"}]}, "contains '$'"),
    ("kernel arg key with =", {"model": "grub.cmdline.current", "contents": [{"key": "a=1"}]}, "is not a kernel argument name"),
    ("kernel arg root", {"model": "grub.cmdline.next", "contents": [{"key": "root", "value": "/dev/sda1"}]}, "set by grub.cfg"),
    ("kernel arg value a list", {"model": "grub.cmdline.next", "contents": [{"key": "a", "value": [1]}]}, "not a list"),
    ("key path empty part", {"model": "kubernetes.kubelet", "contents": [{"key": "a..b", "value": 1}]}, "empty part"),
    ("key path unclosed quote", {"model": "container.containerd", "contents": [{"key": 'plugins."cri.x', "value": 1}]}, "unclosed"),
    ("toml null", {"model": "container.containerd", "contents": [{"key": "a", "value": None}]}, "TOML has no null"),
    ("pam value short", {"model": "pam.limits", "contents": [{"key": "*", "value": "soft.nofile"}]}, "type.item.value"),
    ("pam unknown item", {"model": "pam.limits", "contents": [{"key": "*", "value": "soft.files.10"}]}, "unknown limit item 'files'"),
    ("pam bad limit", {"model": "pam.limits", "contents": [{"key": "*", "value": "soft.nofile.lots"}]}, "must be a number"),
    ("pam domain with space", {"model": "pam.limits", "contents": [{"key": "a b", "value": "soft.nofile.1"}]}, "one word"),
    ("configpath traversal", {"model": "kernel.sysctl.persist", "configpath": "/etc/sysctl.d/../shadow", "contents": []}, "'..'"),
    ("configpath outside", {"model": "kubernetes.kubelet", "configpath": "/etc/passwd", "contents": []}, "outside what kubernetes.kubelet may write"),
    ("configpath relative", {"model": "pam.limits", "configpath": "etc/security/limits.conf", "contents": []}, "absolute path"),
    ("configpath not normalised", {"model": "container.containerd", "configpath": "/etc/containerd//config.toml", "contents": []}, "not normalised"),
    ("missing sysctl key", {"model": "kernel.sysctl", "contents": [{"key": "net.ipv4.no_such_thing", "value": 1}]}, "does not exist on this node"),
    ("path through a scalar", {"model": "kubernetes.kubelet", "contents": [{"key": "maxPods.limit", "value": 1}]}, "maxPods is an integer, not a mapping"),
    ("scalar onto a list", {"model": "kubernetes.kubelet", "contents": [{"key": "clusterDNS", "value": ["a"]}, {"key": "clusterDNS", "value": "b"}]}, "is a list: give a list"),
    ("file not TOML", {"model": "container.containerd", "configpath": "/etc/containerd/broken.toml", "contents": [{"key": "a", "value": 1}]}, "is not valid TOML"),
    ("YAML not a mapping", {"model": "kubernetes.kubelet", "configpath": "/etc/kubernetes/list.yaml", "contents": [{"key": "a", "value": 1}]}, "must hold a YAML mapping"),
]  # fmt: skip


@pytest.mark.parametrize(("entry", "message"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
@pytest.mark.parametrize("position", [0, 3, 5])
def test_wrong_input_is_refused_and_nothing_changes(
    node: Path, entry: dict[str, Any], message: str, position: int
) -> None:
    configs = with_bad(position, entry)
    grub = FakeBootEnv()
    before = fingerprint(node)
    with pytest.raises(models.SysconfigError) as caught:
        configure(node, configs, grub=grub)
    assert message in str(caught.value)
    assert "configs[" in str(caught.value) and "nothing was changed" in str(caught.value)
    assert fingerprint(node) == before
    assert grub.writes == []


def test_every_problem_is_reported_at_once(node: Path) -> None:
    configs = [
        {"model": "kernel.sysctl", "contents": [{"key": "a..b", "value": 1}]},
        {"model": "nope"},
        {"model": "pam.limits", "contents": [{"key": "*", "value": "x"}]},
    ]
    with pytest.raises(models.SysconfigError) as caught:
        configure(node, configs)
    text = str(caught.value)
    assert text.startswith("3 problems, nothing was changed")
    assert "configs[0].contents[0]" in text and "configs[1]" in text and "configs[2].contents[0]" in text


def test_kubeos_operation_spellings_are_accepted() -> None:
    entries = models.parse_configs(
        [{"model": "pam.limits", "configpath": None, "contents": [
            {"key": "*", "value": "soft.nofile.1", "operation": "add"},
            {"key": "*", "value": "soft.nofile.1", "operation": "update"},
            {"key": "*", "value": "soft.nofile.1", "operation": None},
            {"key": "*", "operation": "DELETE"},
        ]}]
    )  # fmt: skip
    assert [c.operation for c in entries[0].contents] == ["", "", "", "delete"]
    assert entries[0].configpath == ""


@pytest.mark.parametrize(
    ("path", "parts"),
    [
        ("a", ["a"]),
        ("authentication.anonymous.enabled", ["authentication", "anonymous", "enabled"]),
        ('evictionHard."memory.available"', ["evictionHard", "memory.available"]),
        (
            "plugins.'io.containerd.grpc.v1.cri'.sandbox_image",
            ["plugins", "io.containerd.grpc.v1.cri", "sandbox_image"],
        ),
        ('"a.b"', ["a.b"]),
    ],
)
def test_key_paths(path: str, parts: list[str]) -> None:
    assert keypath.parse(path) == parts
    assert keypath.parse(keypath.render(parts)) == parts


@pytest.mark.parametrize("path", ["", ".a", "a.", "a..b", '"a', 'a"b', '"a"b', '""', "a. b"])
def test_malformed_key_paths(path: str) -> None:
    with pytest.raises(keypath.KeyPathError):
        keypath.parse(path)


def test_a_symlink_leading_out_of_the_allowed_places_is_refused(node: Path) -> None:
    put(node, "/etc/shadow", "root:x:1::::::\n")
    os.symlink("/etc/shadow", node / "etc/sysctl.d/99-evil.conf")
    os.symlink("../../../../../etc/hostname", node / "etc/sysctl.d/98-out.conf")
    before = fingerprint(node)
    for name in ("99-evil.conf", "98-out.conf"):
        config = {"model": "kernel.sysctl.persist", "configpath": f"/etc/sysctl.d/{name}", "contents": [{"key": "a.b", "value": 1}]}  # fmt: skip
        with pytest.raises(models.SysconfigError, match="symbolic link to"):
            configure(node, [config])
    assert fingerprint(node) == before


def test_a_symlink_between_allowed_places_is_followed_inside_the_root(node: Path) -> None:
    os.symlink("../sysctl.conf", node / "etc/sysctl.d/99-sysctl.conf")
    configure(node, [{"model": "kernel.sysctl.persist", "configpath": "/etc/sysctl.d/99-sysctl.conf", "contents": [{"key": "a.b", "value": 1}]}])  # fmt: skip
    assert read(node, "/etc/sysctl.conf").endswith("a.b = 1\n")
    assert os.path.islink(node / "etc/sysctl.d/99-sysctl.conf")


def test_configpath_in_a_missing_directory_is_refused(node: Path) -> None:
    with pytest.raises(models.SysconfigError, match="does not exist; create it first"):
        configure(node, [{"model": "container.containerd", "configpath": "/etc/containerd/conf.d/x.toml", "contents": [{"key": "a", "value": 1}]}])  # fmt: skip


def test_allowed_places() -> None:
    assert paths.check_configpath("kernel.sysctl.persist", "") == "/etc/sysctl.conf"
    assert (
        paths.check_configpath("kubernetes.kubelet", "/etc/kubernetes/kubelet.yaml") == "/etc/kubernetes/kubelet.yaml"
    )
    with pytest.raises(paths.PathError):
        paths.check_configpath("kernel.sysctl.persist", "/etc/sysctl.d")
    with pytest.raises(paths.PathError):
        paths.check_configpath("pam.limits", "/etc/security/limits.conf.d/x")


def test_check_mode_computes_everything_and_writes_nothing(node: Path) -> None:
    before = fingerprint(node)
    result = configure(node, GOOD, check=True)
    assert result.changed and len(result.changes) == 5
    assert fingerprint(node) == before
    diffs = result.diffs()
    assert {d["before_header"] for d in diffs} >= {"/etc/sysctl.conf", "/var/lib/kubelet/config.yaml"}
    sysctl_diff = next(d for d in diffs if d["before_header"] == "/proc/sys/net/ipv4/ip_forward")
    assert (sysctl_diff["before"], sysctl_diff["after"]) == ("0\n", "1\n")


def test_all_models_apply_then_a_second_run_changes_nothing(node: Path) -> None:
    first = configure(node, GOOD)
    assert first.changed and all(entry.changed for entry in first.entries)
    after = fingerprint(node)
    second = configure(node, GOOD)
    assert not second.changed and not any(entry.changed for entry in second.entries)
    assert fingerprint(node) == after


class _Exploding:
    target = "/the/failing/target"
    model = "test"

    def apply(self) -> None:
        raise OSError(28, "No space left on device")

    def undo(self) -> None:  # pragma: no cover - never made
        raise AssertionError("a change that failed is not undone")

    def diff(self) -> dict[str, Any]:  # pragma: no cover
        return {}


def test_a_failure_midway_restores_what_was_written_before(node: Path) -> None:
    """Four real changes (a sysctl, files, one new file) are written, the fifth fails: all four come back."""
    configs = [
        GOOD[0],
        GOOD[1],
        {"model": "kernel.sysctl.persist", "configpath": "/etc/sysctl.d/50-new.conf", "contents": [{"key": "a.b", "value": 1}]},
        GOOD[2],
    ]  # fmt: skip
    (node / "etc/sysctl.conf").chmod(0o600)
    if os.geteuid() == 0:
        os.chown(node / "etc/sysctl.conf", 4242, 4343)
    before = fingerprint(node)
    result = configure(node, configs, check=True)
    changes = [*result.changes, _Exploding()]
    with pytest.raises(transaction.ApplyError) as caught:
        transaction.apply_all(changes)
    message = str(caught.value)
    assert "writing /the/failing/target failed" in message and "nothing is left changed" in message
    assert caught.value.restored == [
        "/var/lib/kubelet/config.yaml",
        "/etc/sysctl.d/50-new.conf",
        "/etc/sysctl.conf",
        "/proc/sys/net/ipv4/ip_forward",
    ]
    assert fingerprint(node) == before


def test_a_failing_grub_write_restores_the_files_written_before(node: Path) -> None:
    grub = FakeBootEnv(env={"kubeos_default": "A"}, fail_writes=True)
    configs = [GOOD[1], {"model": "grub.cmdline.next", "contents": [{"key": "quiet"}]}, GOOD[2]]
    before = fingerprint(node)
    with pytest.raises(transaction.ApplyError, match="Input/output error"):
        configure(node, configs, grub=grub)
    assert fingerprint(node) == before


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root")
def test_atomic_write_keeps_owner_and_mode_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "f.conf"
    path.write_text("old\n")
    path.chmod(0o640)
    os.chown(path, 1234, 5678)
    snap = atomicfile.snapshot(str(path))
    atomicfile.write(str(path), b"new\n", snap)
    st = path.stat()
    assert (path.read_text(), st.st_mode & 0o7777, st.st_uid, st.st_gid) == ("new\n", 0o640, 1234, 5678)
    assert sorted(os.listdir(tmp_path)) == ["f.conf"]
    atomicfile.restore(snap)
    assert path.read_text() == "old\n"
    fresh = atomicfile.snapshot(str(tmp_path / "new.conf"))
    atomicfile.write(str(tmp_path / "new.conf"), b"x\n", fresh)
    assert (tmp_path / "new.conf").stat().st_mode & 0o7777 == 0o644
    atomicfile.restore(fresh)
    assert not (tmp_path / "new.conf").exists()
