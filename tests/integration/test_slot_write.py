"""kubeos.os.slot_write for real: loop-backed disks, file:// and HTTPS (mTLS) sources, kill -9 mid-write.

Every test starts from a copy of one disk with v1 committed in slot A, and checks that the
bytes of the slot it must not write are the same before and after.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import COLLECTIONS, ModuleResult, blkid, copy_sparse, detach_all, run_playbook, sha256_of, tree_listing
from support.killedwrite import kill_slot_write_midway
from support.osimage import make_ext4_image, make_os_tree, make_tar
from support.tls import Pki, file_server, make_pki

from ansible_collections.kubeos.os.plugins.module_utils import blockdev, slots

pytestmark = pytest.mark.loop
MIB = 1024 * 1024
WRITE = "kubeos.os.slot_write"


class Disk:
    """A laid-out image file and ways to look at it without changing it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def state(self, running_root: str | None = None) -> slots.DiskState:
        with blockdev.attached(str(self.path), writable=False) as disk:
            return slots.read_state(disk, running_root or "/dev/null-root")

    def slot_hash(self, slot: str) -> str:
        with blockdev.attached(str(self.path), writable=False) as disk:
            part = blockdev.read_table(disk).by_name(slots.SLOT_NAMES[slot])
            assert part is not None
            return sha256_of(part.node)

    def env_bytes(self) -> bytes:
        with blockdev.attached(str(self.path), writable=False) as disk:
            layout = slots.recognise(blockdev.read_table(disk))
            with blockdev.mounted(layout.boot.node, readonly=True) as root:
                return (Path(root) / "grub/grubenv").read_bytes()


@pytest.fixture(scope="module")
def payloads(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """v1 and v2 as raw ext4 images, v2 also as a tar; with their sha256."""
    work = tmp_path_factory.mktemp("payloads")
    out: dict[str, Any] = {"dir": work}
    for version in ("v1", "v2"):
        tree = make_os_tree(work / f"tree-{version}", version)
        out[f"{version}.ext4"] = work / f"{version}.ext4"
        out[f"{version}.ext4.sha256"] = make_ext4_image(tree, out[f"{version}.ext4"], size_mib=32)
    out["v2.tar"] = work / "v2.tar"
    out["v2.tar.sha256"] = make_tar(work / "tree-v2", out["v2.tar"])
    return out


@pytest.fixture(scope="module")
def base_disk(tmp_path_factory: pytest.TempPathFactory, payloads: dict[str, Any]) -> Iterator[Path]:
    """A 1 GiB image: laid out, v1 written into A and committed."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    work = tmp_path_factory.mktemp("base")
    image = work / "base.img"
    with open(image, "wb") as handle:
        handle.truncate(1024 * MIB)
    tasks = [
        {"kubeos.os.disk_layout": {"device": str(image), "root_size": "256MiB"}},
        {
            WRITE: {
                "device": str(image),
                "slot": "A",
                "src": f"file://{payloads['v1.ext4']}",
                "sha256": payloads["v1.ext4.sha256"],
            }
        },
        {"kubeos.os.boot_slot": {"device": str(image), "state": "committed", "slot": "A"}},
    ]
    status, _, stdout = run_playbook(work / "runner", [{"hosts": "localhost", "gather_facts": False, "tasks": tasks}])
    try:
        assert status == "successful", stdout
        yield image
    finally:
        detach_all(image)


@pytest.fixture
def disk(base_disk: Path, tmp_path: Path) -> Iterator[Disk]:
    copy = tmp_path / "disk.img"
    copy_sparse(base_disk, copy)
    try:
        yield Disk(copy)
    finally:
        detach_all(copy)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def test_file_image_goes_into_the_inactive_slot_and_is_marked_bootable_only_when_verified(
    disk: Disk, payloads: dict[str, Any], run_module: Callable[..., ModuleResult]
) -> None:
    a_before = disk.slot_hash("A")
    res = run_module(
        WRITE, {"device": str(disk.path), "src": f"file://{payloads['v2.ext4']}", "sha256": payloads["v2.ext4.sha256"]}
    )
    assert res.changed and not res.failed, res.result
    assert res.result["slot"] == "B"
    assert res.result["version"] == "v2"
    state = disk.state()
    assert state.slots["B"].bootable and state.slots["B"].content.pretty_name == "KubeOS v2"
    assert state.grub.env["kubeos_B_image"] == payloads["v2.ext4.sha256"]
    assert state.grub.default == "A" and state.grub.trial is None
    # The raw image brought its own label; the slot keeps the layout's.
    assert state.slots["B"].part.label == "ROOT-B"
    assert disk.slot_hash("A") == a_before


def test_writing_the_image_a_slot_already_holds_changes_nothing(
    disk: Disk, payloads: dict[str, Any], run_module: Callable[..., ModuleResult]
) -> None:
    args = {"device": str(disk.path), "src": f"file://{payloads['v2.ext4']}", "sha256": payloads["v2.ext4.sha256"]}
    assert run_module(WRITE, args).changed
    env = disk.env_bytes()
    again = run_module(WRITE, args)
    assert not again.changed and not again.failed, again.result
    assert disk.env_bytes() == env


def test_wrong_checksum_leaves_the_slot_not_bootable_and_the_active_slot_untouched(
    disk: Disk, payloads: dict[str, Any], run_module: Callable[..., ModuleResult]
) -> None:
    a_before = disk.slot_hash("A")
    res = run_module(WRITE, {"device": str(disk.path), "src": f"file://{payloads['v2.ext4']}", "sha256": "0" * 64})
    assert res.failed
    assert "sha256" in res.msg and "expected" in res.msg
    state = disk.state()
    assert not state.slots["B"].marked_bootable and not state.slots["B"].bootable
    assert "kubeos_B_image" not in state.grub.env
    # Unverified bytes are not left looking like a filesystem.
    assert blkid(state.slots["B"].part.node).get("TYPE") is None
    assert disk.slot_hash("A") == a_before
    assert state.grub.default == "A"


def test_the_committed_slot_of_a_disk_that_is_not_running_is_refused(
    disk: Disk, payloads: dict[str, Any], run_module: Callable[..., ModuleResult]
) -> None:
    a_before, env_before = disk.slot_hash("A"), disk.env_bytes()
    res = run_module(
        WRITE,
        {
            "device": str(disk.path),
            "slot": "A",
            "src": f"file://{payloads['v2.ext4']}",
            "sha256": payloads["v2.ext4.sha256"],
        },
    )
    assert res.failed and "refusing to write slot A" in res.msg and "committed" in res.msg
    assert disk.slot_hash("A") == a_before and disk.env_bytes() == env_before


def test_the_running_slot_is_refused_whatever_is_asked(
    disk: Disk, payloads: dict[str, Any], run_module: Callable[..., ModuleResult]
) -> None:
    # Put v2 in B and say the system runs it: B is then the active slot.
    assert run_module(
        WRITE, {"device": str(disk.path), "src": f"file://{payloads['v2.ext4']}", "sha256": payloads["v2.ext4.sha256"]}
    ).changed
    running = f"PARTUUID={disk.state().slots['B'].part.partuuid}"
    b_before, env_before = disk.slot_hash("B"), disk.env_bytes()
    res = run_module(
        WRITE,
        {
            "device": str(disk.path),
            "slot": "B",
            "running_root": running,
            "force": True,
            "src": f"file://{payloads['v1.ext4']}",
            "sha256": payloads["v1.ext4.sha256"],
        },
    )
    assert res.failed and "running system" in res.msg
    assert disk.slot_hash("B") == b_before and disk.env_bytes() == env_before


def test_check_mode_reports_the_slot_and_writes_nothing(
    disk: Disk, payloads: dict[str, Any], run_module: Callable[..., ModuleResult]
) -> None:
    b_before, env_before = disk.slot_hash("B"), disk.env_bytes()
    res = run_module(
        WRITE,
        {"device": str(disk.path), "src": f"file://{payloads['v2.ext4']}", "sha256": payloads["v2.ext4.sha256"]},
        check=True,
    )
    assert res.changed and res.result["slot"] == "B"
    assert disk.slot_hash("B") == b_before and disk.env_bytes() == env_before


def test_https_with_the_right_client_certificate_writes_and_a_wrong_or_missing_one_changes_nothing(
    disk: Disk, payloads: dict[str, Any], pki: Pki, run_module: Callable[..., ModuleResult]
) -> None:
    a_before = disk.slot_hash("A")
    with file_server(payloads["dir"], pki=pki, require_client_cert=True) as url:
        base = {
            "device": str(disk.path),
            "src": f"{url}/v2.ext4",
            "sha256": payloads["v2.ext4.sha256"],
            "ca_cert": str(pki.ca_cert),
        }
        b_before, env_before = disk.slot_hash("B"), disk.env_bytes()
        missing = run_module(WRITE, base)
        wrong = run_module(
            WRITE, {**base, "client_cert": str(pki.bad_client_cert), "client_key": str(pki.bad_client_key)}
        )
        for res in (missing, wrong):
            assert res.failed, res.result
            assert url in res.msg
        # Refused before anything was touched: not even the bootable flag changed.
        assert disk.slot_hash("B") == b_before and disk.env_bytes() == env_before
        good = run_module(WRITE, {**base, "client_cert": str(pki.client_cert), "client_key": str(pki.client_key)})
        assert good.changed and not good.failed, good.result
    assert disk.state().slots["B"].bootable
    assert disk.slot_hash("A") == a_before


def test_https_refuses_a_server_the_given_ca_did_not_sign(
    disk: Disk, payloads: dict[str, Any], pki: Pki, run_module: Callable[..., ModuleResult]
) -> None:
    env_before = disk.env_bytes()
    with file_server(payloads["dir"], pki=pki) as url:
        res = run_module(
            WRITE,
            {
                "device": str(disk.path),
                "src": f"{url}/v2.ext4",
                "sha256": payloads["v2.ext4.sha256"],
                "ca_cert": str(pki.bad_ca_cert),
            },
        )
    assert res.failed and "certificate" in res.msg.lower()
    assert disk.env_bytes() == env_before


def test_plain_http_needs_allow_insecure_http(
    disk: Disk, payloads: dict[str, Any], run_module: Callable[..., ModuleResult]
) -> None:
    with file_server(payloads["dir"]) as url:
        args = {"device": str(disk.path), "src": f"{url}/v2.ext4", "sha256": payloads["v2.ext4.sha256"]}
        refused = run_module(WRITE, args)
        assert refused.failed and "allow_insecure_http" in refused.msg
        allowed = run_module(WRITE, {**args, "allow_insecure_http": True})
        assert allowed.changed and not allowed.failed, allowed.result


def test_tar_root_filesystem_comes_out_identical(
    disk: Disk, tmp_path: Path, run_module: Callable[..., ModuleResult]
) -> None:
    tree = make_os_tree(tmp_path / "tree", "v2")
    (tree / "usr/bin").mkdir(parents=True)
    tool = tree / "usr/bin/tool"
    tool.write_bytes(b"#!/bin/sh\necho tool\n")
    os.chmod(tool, 0o4755)
    os.setxattr(tool, "user.kubeos", b"xattr value")
    os.setxattr(
        tool, "security.capability", bytes.fromhex("0100000200200000000000000000000000000000")
    )  # cap_net_bind_service+ep
    os.link(tool, tree / "usr/bin/tool-hardlink")
    os.symlink("/usr/bin/tool", tree / "usr/bin/tool-abs-symlink")
    (tree / "dev").mkdir()
    os.mknod(tree / "dev/null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mkfifo(tree / "dev/fifo", 0o600)
    (tree / "tmp").mkdir(mode=0o1777)
    os.chmod(tree / "tmp", 0o1777)
    owned = tree / "etc/owned"
    owned.write_text("owned by 1234:5678\n")
    os.chown(owned, 1234, 5678)
    archive = tmp_path / "rootfs.tar"
    digest = make_tar(tree, archive)
    res = run_module(WRITE, {"device": str(disk.path), "src": f"file://{archive}", "sha256": digest, "format": "tar"})
    assert res.changed and not res.failed, res.result
    with blockdev.attached(str(disk.path), writable=False) as dev:
        part = blockdev.read_table(dev).by_name("ROOT-B")
        assert part is not None and part.label == "ROOT-B"
        with blockdev.mounted(part.node, readonly=True) as root:
            assert tree_listing(Path(root)) == tree_listing(tree)


def test_a_write_killed_midway_leaves_the_slot_not_bootable_and_a_retry_succeeds(
    disk: Disk, tmp_path: Path, payloads: dict[str, Any], run_module: Callable[..., ModuleResult]
) -> None:
    image = payloads["v2.ext4"]
    a_before = disk.slot_hash("A")
    kill_slot_write_midway(tmp_path / "killed", COLLECTIONS, disk.path, image, payloads["v2.ext4.sha256"])
    state = disk.state()
    assert not state.slots["B"].marked_bootable and not state.slots["B"].bootable
    assert state.grub.default == "A" and state.slots["A"].bootable
    assert disk.slot_hash("A") == a_before
    retry = run_module(
        WRITE, {"device": str(disk.path), "src": f"file://{image}", "sha256": payloads["v2.ext4.sha256"]}
    )
    assert retry.changed and not retry.failed, retry.result
    assert disk.state().slots["B"].bootable
