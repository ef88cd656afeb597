"""kubeos.os.sysconfig run for real through ansible-runner: every model on real files in a temporary root,
check and diff mode, refusals that leave the tree as it was, a write failing midway (a read-only bind mount)
rolled back, and kernel arguments in the GRUB environment of a disk image laid out by kubeos.os.disk_layout."""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ModuleResult

from vmtest.disk import mounted_partition

FQCN = "kubeos.os.sysconfig"
CRI = 'plugins."io.containerd.grpc.v1.cri"'

FILES = {
    "etc/sysctl.conf": "# boot-time kernel settings\nvm.swappiness = 60\nkernel.pid_max = 4096\n",
    "proc/sys/net/ipv4/ip_forward": "0\n",
    "var/lib/kubelet/config.yaml": "# kubelet\nkind: KubeletConfiguration\nclusterDNS:\n- 10.96.0.10\nmaxPods: 110\n",
    "etc/containerd/config.toml": f'version = 2\n\n[{CRI}]\n  sandbox_image = "pause:3.8"  # pause\n',
    "etc/security/limits.conf": "# limits\n*    soft    nofile    1024\n",
}
CONFIGS: list[dict[str, Any]] = [
    {"model": "kernel.sysctl", "contents": [{"key": "net.ipv4.ip_forward", "value": 1}]},
    {
        "model": "kernel.sysctl.persist",
        "contents": [{"key": "vm.swappiness", "value": 10}, {"key": "kernel.pid_max", "operation": "delete"}],
    },
    {
        "model": "kubernetes.kubelet",
        "contents": [{"key": "clusterDNS", "value": ["10.96.0.11"]}, {"key": "featureGates.Foo", "value": True}],
    },
    {"model": "container.containerd", "contents": [{"key": f"{CRI}.sandbox_image", "value": "pause:3.9"}]},
    {"model": "pam.limits", "contents": [{"key": "*", "value": "soft.nofile.65535"}]},
]


def fingerprint(root: Path) -> dict[str, tuple[Any, ...]]:
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            digest = hashlib.sha256(Path(path).read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) else ""
            out[os.path.relpath(path, root)] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, digest)
    return out


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    for rel, text in FILES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def sysconfig(
    run_module: Callable[..., ModuleResult], root: Path, configs: list[dict[str, Any]], **kw: Any
) -> ModuleResult:
    check = kw.pop("check", False)
    diff = kw.pop("diff", False)
    return run_module(FQCN, {"root": str(root), "configs": configs, **kw}, check=check, diff=diff)


def test_every_file_model_applied_then_unchanged_on_the_second_run(
    root: Path, run_module: Callable[..., ModuleResult]
) -> None:
    first = sysconfig(run_module, root, CONFIGS, diff=True)
    assert first.status == "changed", first.msg or first.stdout
    assert first.result["changed_targets"] == [
        "/proc/sys/net/ipv4/ip_forward",
        "/etc/sysctl.conf",
        "/var/lib/kubelet/config.yaml",
        "/etc/containerd/config.toml",
        "/etc/security/limits.conf",
    ]
    assert (root / "proc/sys/net/ipv4/ip_forward").read_text() == "1\n"
    assert (root / "etc/sysctl.conf").read_text() == "# boot-time kernel settings\nvm.swappiness = 10\n"
    assert (root / "var/lib/kubelet/config.yaml").read_text() == (
        "# kubelet\nkind: KubeletConfiguration\nclusterDNS:\n- 10.96.0.10\n- 10.96.0.11\nmaxPods: 110\nfeatureGates:\n  Foo: true\n"
    )
    assert 'sandbox_image = "pause:3.9"  # pause' in (root / "etc/containerd/config.toml").read_text()
    assert (root / "etc/security/limits.conf").read_text() == "# limits\n*    soft    nofile    65535\n"
    entry = first.result["results"][1]
    assert entry["model"] == "kernel.sysctl.persist" and entry["target"] == "/etc/sysctl.conf"
    assert entry["contents"][1] == {
        "key": "kernel.pid_max",
        "operation": "delete",
        "before": "4096",
        "after": None,
        "changed": True,
    }
    # ansible's callback shows each diff; the module returns one per target.
    assert "+vm.swappiness = 10" in first.stdout and "-kernel.pid_max = 4096" in first.stdout

    after = fingerprint(root)
    second = sysconfig(run_module, root, CONFIGS, diff=True)
    assert second.status == "ok", second.msg
    assert second.result["changed_targets"] == [] and not any(e["changed"] for e in second.result["results"])
    assert fingerprint(root) == after


def test_check_mode_reports_the_changes_and_writes_nothing(root: Path, run_module: Callable[..., ModuleResult]) -> None:
    before = fingerprint(root)
    res = sysconfig(run_module, root, CONFIGS, check=True, diff=True)
    assert res.status == "changed", res.msg
    assert len(res.result["diff"]) == 5
    assert fingerprint(root) == before


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (
            {"model": "kernel.sysctl", "contents": [{"key": "net.ipv4.tcp_nope", "value": 1}]},
            "does not exist on this node",
        ),
        (
            {"model": "kernel.sysctl.persist", "configpath": "/etc/sysctl.d/../passwd", "contents": []},
            "no path traversal",
        ),
        ({"model": "kubernetes.kubelet", "contents": [{"key": "maxPods..x", "value": 1}]}, "empty part"),
        ({"model": "pam.limits", "contents": [{"key": "*", "value": 65535}]}, "not an integer"),
        ({"model": "kernel.swap", "contents": []}, "unknown model 'kernel.swap'"),
    ],
)
def test_wrong_input_fails_with_a_clear_message_and_nothing_changes(
    root: Path, run_module: Callable[..., ModuleResult], bad: dict[str, Any], message: str
) -> None:
    before = fingerprint(root)
    res = sysconfig(run_module, root, [*CONFIGS, bad])
    assert res.failed, res.result
    assert message in res.msg and "nothing was changed" in res.msg, res.msg
    assert fingerprint(root) == before


def test_service_actions_are_refused_for_a_tree_that_is_not_running(
    root: Path, run_module: Callable[..., ModuleResult]
) -> None:
    before = fingerprint(root)
    res = sysconfig(run_module, root, CONFIGS, restart_kubelet=True)
    assert res.failed and "act on the running system" in res.msg
    assert fingerprint(root) == before


@contextlib.contextmanager
def read_only(directory: Path) -> Iterator[None]:
    """``directory`` as a read-only bind mount of itself: writing there fails even for root."""
    subprocess.run(["mount", "--bind", str(directory), str(directory)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(directory)], check=True)
        yield
    finally:
        subprocess.run(["umount", str(directory)], check=True)


def test_a_failure_midway_restores_what_the_call_had_written(
    root: Path, run_module: Callable[..., ModuleResult]
) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (bind mounts)")
    before = fingerprint(root)
    with read_only(root / "etc/containerd"):
        res = sysconfig(run_module, root, CONFIGS)
    assert res.failed
    assert "writing /etc/containerd/config.toml failed" in res.msg and "Read-only file system" in res.msg, res.msg
    assert "nothing is left changed" in res.msg
    assert res.result["restored"] == [
        "/var/lib/kubelet/config.yaml",
        "/etc/sysctl.conf",
        "/proc/sys/net/ipv4/ip_forward",
    ]
    assert fingerprint(root) == before


# --- kernel arguments on a disk image -----------------------------------------------------------------


def grubenv_list(image: Path) -> dict[str, str]:
    """The GRUB environment as the real grub-editenv lists it."""
    with mounted_partition(image, "BOOT") as boot:
        out = subprocess.run(
            ["grub-editenv", str(boot / "grub/grubenv"), "list"], capture_output=True, text=True, check=True
        ).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


@pytest.fixture
def disk(image_file: Callable[..., Path], run_module: Callable[..., ModuleResult]) -> Path:
    image = image_file("node.img", size_mib=320)
    res = run_module("kubeos.os.disk_layout", {"device": str(image), "root_size": "64MiB"})
    assert not res.failed, res.msg
    return image


@pytest.mark.loop
def test_kernel_arguments_per_slot_in_the_grub_environment(
    disk: Path, tmp_path: Path, run_module: Callable[..., ModuleResult]
) -> None:
    empty = tmp_path / "empty-root"
    empty.mkdir()
    nxt = {"model": "grub.cmdline.next", "contents": [{"key": "kubeos.testarg", "value": 1}, {"key": "kubeos.flag"}]}
    cur = {"model": "grub.cmdline.current", "contents": [{"key": "loglevel", "value": 3}]}
    res = sysconfig(run_module, empty, [nxt, cur], device=str(disk), diff=True)
    assert res.status == "changed", res.msg
    # Not running: "current" is the committed slot A, "next" the other one.
    assert [(e["model"], e["slot"]) for e in res.result["results"]] == [
        ("grub.cmdline.next", "B"),
        ("grub.cmdline.current", "A"),
    ]
    env = grubenv_list(disk)
    assert env["kubeos_B_cmdline"] == "kubeos.testarg=1 kubeos.flag"
    assert env["kubeos_A_cmdline"] == "loglevel=3"
    assert env["kubeos_default"] == "A"

    again = sysconfig(run_module, empty, [nxt, cur], device=str(disk))
    assert again.status == "ok", again.msg

    # key=value into a bare key, and a delete, in one call.
    change = {
        "model": "grub.cmdline.next",
        "contents": [{"key": "kubeos.testarg", "value": ""}, {"key": "kubeos.flag", "operation": "delete"}],
    }
    res = sysconfig(run_module, empty, [change], device=str(disk))
    assert res.status == "changed", res.msg
    assert res.result["results"][0]["contents"][0]["before"] == "kubeos.testarg=1"
    assert grubenv_list(disk)["kubeos_B_cmdline"] == "kubeos.testarg"

    # Running slot B (as the kernel command line would say): "current" is now B.
    partuuid = subprocess.run(
        ["sfdisk", "--part-uuid", str(disk), "4"], capture_output=True, text=True, check=True
    ).stdout.strip()
    res = sysconfig(
        run_module, empty, [{"model": "grub.cmdline.current", "contents": [{"key": "quiet"}]}],
        device=str(disk), running_root=f"PARTUUID={partuuid}",
    )  # fmt: skip
    assert res.status == "changed" and res.result["results"][0]["slot"] == "B", res.msg
    assert grubenv_list(disk)["kubeos_B_cmdline"] == "kubeos.testarg quiet"


@pytest.mark.loop
def test_kernel_arguments_that_do_not_fit_the_block_change_nothing(
    disk: Path, tmp_path: Path, run_module: Callable[..., ModuleResult]
) -> None:
    before = grubenv_list(disk)
    many = [{"key": f"kubeos.long{i}", "value": "x" * 60} for i in range(20)]
    res = sysconfig(run_module, tmp_path, [{"model": "grub.cmdline.next", "contents": many}], device=str(disk))
    assert res.failed and "do not fit into the GRUB environment block" in res.msg, res.msg
    assert grubenv_list(disk) == before
