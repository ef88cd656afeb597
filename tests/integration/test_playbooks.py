"""The user-facing playbooks, run for real through ansible-runner: build_image.yml and provision.yml."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ansible_runner
import pytest
from conftest import COLLECTIONS, REPO, detach_all, sha256_of
from support.osimage import make_os_tree, make_tar

from ansible_collections.kubeos.os.plugins.module_utils import blockdev, slots

pytestmark = pytest.mark.loop


def run_playbook_file(workdir: Path, name: str, extravars: dict[str, Any]) -> tuple[str, str, dict[str, int]]:
    """Run playbooks/<name> with ansible-runner; return (status, stdout, changed count per host)."""
    workdir.mkdir(parents=True, exist_ok=True)
    runner = ansible_runner.run(
        private_data_dir=str(workdir),
        playbook=str(REPO / "playbooks" / name),
        envvars={
            "ANSIBLE_COLLECTIONS_PATH": str(COLLECTIONS),
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_LOCALHOST_WARNING": "False",
            "ANSIBLE_INVENTORY_UNPARSED_WARNING": "False",
        },
        extravars=extravars,
        quiet=True,
        rotate_artifacts=1,
    )
    stdout = runner.stdout.read() if runner.stdout else ""
    return runner.status, stdout, dict(runner.stats.get("changed", {})) if runner.stats else {}


def test_build_image_makes_a_payload_and_a_bootable_disk_image_and_is_idempotent(
    tmp_path: Path, image_file: Callable[..., Path]
) -> None:
    tree = make_os_tree(tmp_path / "tree", "7")
    rootfs = tmp_path / "rootfs.tar"
    make_tar(tree, rootfs)
    out = tmp_path / "out"
    extravars = {
        "rootfs": str(rootfs),
        "output_dir": str(out),
        "name": "kubeos-7",
        "disk_size": "1GiB",
        "root_size": "256MiB",
        "qcow2": True,
    }
    try:
        status, stdout, _ = run_playbook_file(tmp_path / "run1", "build_image.yml", extravars)
        assert status == "successful", stdout

        manifest = json.loads((out / "kubeos-7.json").read_text())
        assert manifest["version"] == "7" and manifest["format"] == "raw"
        assert manifest["sha256"] == sha256_of(str(out / "kubeos-7.ext4"))
        assert manifest["size"] == (out / "kubeos-7.ext4").stat().st_size
        assert (out / "kubeos-7.ext4.sha256").read_text().split()[0] == manifest["sha256"]
        info = json.loads(
            subprocess.run(
                ["qemu-img", "info", "--output=json", str(out / "kubeos-7.qcow2")],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        assert info["format"] == "qcow2" and info["virtual-size"] == 1024 * 1024 * 1024

        with blockdev.attached(str(out / "kubeos-7.img"), writable=False) as disk:
            state = slots.read_state(disk)
            assert state.layout.kind == "kubeos"
            assert state.grub.default == "A" and state.slots["A"].bootable
            assert state.slots["A"].content.version == "7"
            assert not state.slots["B"].marked_bootable and not state.slots["B"].content.os_release
            with blockdev.mounted(state.layout.persist.node, readonly=True) as persist:
                for directory in ("etc-overlay/upper", "etc-overlay/work", "var", "kubeos/journal"):
                    assert (Path(persist) / directory).is_dir(), directory

        status, stdout, changed = run_playbook_file(tmp_path / "run2", "build_image.yml", extravars)
        assert status == "successful", stdout
        assert changed.get("localhost", 0) == 0, stdout
    finally:
        detach_all(out / "kubeos-7.img")


def test_provision_refuses_a_disk_in_use_and_changes_nothing(tmp_path: Path, image_file: Callable[..., Path]) -> None:
    disk = image_file("node.img", size_mib=1024)
    status, stdout, _ = run_playbook_file(
        tmp_path / "run1", "provision.yml", {"device": str(disk), "root_size": "256MiB"}
    )
    assert status == "successful", stdout
    loop = blockdev.loop_attach(str(disk))
    try:
        blockdev.sync_kernel_partitions(loop)
        persist = blockdev.read_table(loop).by_name("PERSIST")
        assert persist is not None
        with blockdev.mounted(persist.node, readonly=False) as root:
            (Path(root) / "keep-me").write_text("data\n")
            status, stdout, _ = run_playbook_file(
                tmp_path / "run2", "provision.yml", {"device": str(disk), "root_size": "256MiB", "force": True}
            )
            assert status == "failed"
            assert "is mounted at" in stdout and "nothing was changed" in stdout.lower()
    finally:
        blockdev.loop_detach(loop)
    with blockdev.attached(str(disk), writable=False) as dev:
        persist = blockdev.read_table(dev).by_name("PERSIST")
        assert persist is not None
        with blockdev.mounted(persist.node, readonly=True) as root:
            assert (Path(root) / "keep-me").read_text() == "data\n"


def test_provision_over_ssh_lays_out_the_disk_and_installs_the_first_os(
    tmp_path: Path, image_file: Callable[..., Path]
) -> None:
    from support import sshd

    if not sshd.available():
        pytest.skip("OpenSSH server and client are not installed (scripts/setup.sh installs them)")
    disk = image_file("remote.img", size_mib=1024)
    tree = make_os_tree(tmp_path / "tree", "9")
    rootfs = tmp_path / "rootfs.tar"
    digest = make_tar(tree, rootfs)
    with sshd.sshd(tmp_path / "sshd") as server:
        inventory = {
            "all": {"hosts": {"node1": {**server.inventory_vars(), "ansible_python_interpreter": sys.executable}}}
        }
        workdir = tmp_path / "run"
        workdir.mkdir()
        runner = ansible_runner.run(
            private_data_dir=str(workdir),
            playbook=str(REPO / "playbooks" / "provision.yml"),
            inventory=inventory,
            # No SSH master connection may outlive the test.
            envvars={
                "ANSIBLE_COLLECTIONS_PATH": str(COLLECTIONS),
                "ANSIBLE_NOCOLOR": "1",
                "ANSIBLE_SSH_ARGS": "-o ControlMaster=no",
            },
            extravars={
                "target": "node1",
                "device": str(disk),
                "root_size": "256MiB",
                "image": f"file://{rootfs}",
                "sha256": digest,
                "format": "tar",
            },
            quiet=True,
            rotate_artifacts=1,
        )
        stdout = runner.stdout.read() if runner.stdout else ""
        assert runner.status == "successful", stdout
        assert "node1" in (runner.stats or {}).get("ok", {}), stdout
    with blockdev.attached(str(disk), writable=False) as dev:
        state = slots.read_state(dev)
        assert state.grub.default == "A" and state.slots["A"].bootable
        assert state.slots["A"].content.version == "9"
