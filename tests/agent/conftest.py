"""Fixtures of the agent tests.

A node disk is laid out and provisioned once per session by the real ``kubeos.os.provision`` role
(slot A: OS 1.0, committed; slot B empty), and once more with OS 2.0 written into slot B by the real
``kubeos.os.slot_write`` (the "prepared" template). Every test works on its own sparse copy, with its
own socket, journal, artifacts and a reboot command that only records that it was called.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import detach_all, run_playbook
from support.osimage import make_ext4_image, make_os_tree

from .helpers import Node, loop_devices_over, node_settings, partitions_of

MIB = 1024 * 1024
DISK_MIB = 320
ROOT_SIZE = "64MiB"


@dataclass(frozen=True)
class Images:
    base: Path
    fresh: Path  # A = 1.0 committed, B empty
    prepared: Path  # and B = 2.0 written (bootable, not armed)
    www: Path  # served directory: the upgrade payload
    v2: Path
    v2_sha256: str
    v1_sha256: str


def _must(workdir: Path, plays: list[dict[str, object]]) -> None:
    status, _events, stdout = run_playbook(workdir, plays)
    assert status == "successful", stdout


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Images]:
    if os.geteuid() != 0:
        pytest.skip("needs root (loop devices, mkfs, mount)")
    base = tmp_path_factory.mktemp("agent-images")
    www = base / "www"
    www.mkdir()
    v1 = base / "os-1.0.ext4"
    v1_sha = make_ext4_image(make_os_tree(base / "tree-1.0", "1.0"), v1, size_mib=24)
    v2 = www / "os-2.0.ext4"
    v2_sha = make_ext4_image(make_os_tree(base / "tree-2.0", "2.0"), v2, size_mib=32)
    fresh, prepared = base / "fresh.img", base / "prepared.img"
    with open(fresh, "wb") as handle:
        handle.truncate(DISK_MIB * MIB)
    try:
        role = {
            "kubeos_provision_device": str(fresh),
            "kubeos_provision_root_size": ROOT_SIZE,
            "kubeos_provision_image_src": f"file://{v1}",
            "kubeos_provision_image_sha256": v1_sha,
        }
        play = {"hosts": "localhost", "gather_facts": False, "roles": [{"role": "kubeos.os.provision", **role}]}
        _must(base / "provision", [play])
        subprocess.run(["cp", "--sparse=always", str(fresh), str(prepared)], check=True)
        write = {"device": str(prepared), "src": f"file://{v2}", "sha256": v2_sha}
        _must(
            base / "prepare",
            [{"hosts": "localhost", "gather_facts": False, "tasks": [{"kubeos.os.slot_write": write}]}],
        )
        yield Images(base, fresh, prepared, www, v2, v2_sha, v1_sha)
    finally:
        for image in (fresh, prepared):
            detach_all(image)


@pytest.fixture
def make_node(images: Images, tmp_path: Path) -> Iterator[Callable[..., Node]]:
    """``make_node("fresh" | "prepared")``: a private copy of a template with its agent configuration."""
    made: list[Node] = []

    def make(template: str = "fresh") -> Node:
        root = tmp_path / f"node{len(made)}"
        root.mkdir()
        (root / "certs").mkdir()
        image = root / "disk.img"
        subprocess.run(["cp", "--sparse=always", str(getattr(images, template)), str(image)], check=True)
        partitions = partitions_of(image)
        node = Node(root=root, image=image, partitions=partitions)
        node.configure(**node_settings(root, image, partitions))
        made.append(node)
        return node

    try:
        yield make
    finally:
        for node in made:
            detach_all(node.image)
            assert loop_devices_over(node.image) == [], "a loop device was left over the node's disk"
