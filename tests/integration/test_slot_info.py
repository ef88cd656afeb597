"""kubeos.os.slot_info on disk images: layout, slots, what they hold, which one runs, the GRUB state.

Two images are made once per module by the real modules: a freshly laid-out one, and a copy of it
with an OS written into slot A (tar archive) and slot B (raw ext4 image) by kubeos.os.slot_write.
slot_info only reads, so the tests share them (one test checks that it really changes nothing).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    ModuleResult,
    copy_sparse,
    detach_all,
    loop_devices_of,
    run_module_once,
    sfdisk_json,
    sha256_of,
)
from support.osimage import make_ext4_image, make_os_tree, make_tar

MIB = 1024 * 1024
SIZE_MIB = 300
ROOT_SIZE = "64MiB"
FQCN = "kubeos.os.slot_info"
MTOOLS_ENV = {**os.environ, "MTOOLS_SKIP_CHECK": "1", "LC_ALL": "C"}

pytestmark = pytest.mark.loop


def run_once(workdir: Path, fqcn: str, args: dict[str, Any]) -> dict[str, Any]:
    """One successful real module run outside a test function (for module-scoped fixtures)."""
    res = run_module_once(workdir, fqcn, args)
    assert not res.failed, f"{fqcn} failed:\n{res.stdout}"
    return res.result


def facts_of(res: ModuleResult) -> dict[str, Any]:
    assert not res.failed, res.msg
    assert not res.changed
    facts = res.result["ansible_facts"]["kubeos"]
    assert facts == res.result["kubeos"]
    return facts  # type: ignore[no-any-return]


@contextlib.contextmanager
def attached(image: Path) -> Iterator[str]:
    """A loop device over the whole image with its partition nodes; detached afterwards."""
    device = subprocess.run(
        ["losetup", "--find", "--show", str(image)], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        subprocess.run(["partx", "--update", device], check=False)
        yield device
    finally:
        subprocess.run(["losetup", "--detach", device], check=False)


def wait_for(node: str) -> str:
    for _attempt in range(100):
        if os.path.exists(node):
            return node
        subprocess.run(["sleep", "0.05"], check=False)
    raise AssertionError(f"{node} did not appear")


# --- images made once per module ------------------------------------------------------------------


@dataclass
class Images:
    fresh: Path
    written: Path


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Images]:
    if os.geteuid() != 0:
        pytest.skip("needs root (loop devices, mkfs, mount)")
    base = tmp_path_factory.mktemp("slot-info")
    fresh, written = base / "fresh.img", base / "written.img"
    with open(fresh, "wb") as handle:
        handle.truncate(SIZE_MIB * MIB)
    try:
        run_once(base / "r1", "kubeos.os.disk_layout", {"device": str(fresh), "root_size": ROOT_SIZE})
        copy_sparse(fresh, written)
        tar = base / "os-1.0.tar"
        tar_sha = make_tar(make_os_tree(base / "tree-1.0", "1.0"), tar)
        raw = base / "os-2.0.ext4"
        raw_sha = make_ext4_image(make_os_tree(base / "tree-2.0", "2.0"), raw, size_mib=32)
        for workdir, slot, src, sha, fmt in (("r2", "A", tar, tar_sha, "tar"), ("r3", "B", raw, raw_sha, "raw")):
            args = {"device": str(written), "slot": slot, "src": f"file://{src}", "sha256": sha, "format": fmt}
            run_once(base / workdir, "kubeos.os.slot_write", args)
        yield Images(fresh, written)
    finally:
        detach_all(fresh)
        detach_all(written)


def partuuid(image: Path, name: str) -> str:
    """The PARTUUID as sfdisk prints it (upper case)."""
    return next(p["uuid"] for p in sfdisk_json(str(image))["partitions"] if p["name"] == name)  # type: ignore[no-any-return]


# --- tests ---------------------------------------------------------------------------------------------


def test_fresh_disk_reports_slot_a_committed_and_no_slot_bootable(
    images: Images, run_module: Callable[..., ModuleResult]
) -> None:
    before = sha256_of(str(images.fresh))
    facts = facts_of(run_module(FQCN, {"device": str(images.fresh)}))
    assert facts["layout"] == "kubeos"
    assert (facts["active_slot"], facts["active_source"], facts["inactive_slot"]) == ("A", "committed", "B")
    assert facts["running_slot"] is None
    assert facts["grub"]["default"] == "A"
    assert facts["grub"]["trial"] is None
    assert facts["bios_boot"] is False
    assert facts["esp"]["label"] == "ESP" and facts["boot"]["label"] == "BOOT"
    assert facts["persist"]["label"] == "PERSIST"
    for slot in ("A", "B"):
        info = facts["slots"][slot]
        assert (info["label"], info["partlabel"], info["fstype"]) == (f"ROOT-{slot}", f"ROOT-{slot}", "ext4")
        assert info["partuuid"] == partuuid(images.fresh, f"ROOT-{slot}").lower()
        assert (info["bootable"], info["marked_bootable"], info["has_kernel"]) == (False, False, False)
        assert info["version"] == ""
    assert sha256_of(str(images.fresh)) == before, "slot_info changed the disk"
    assert loop_devices_of(images.fresh) == []


def test_written_slots_report_their_os_version_and_kernel(
    images: Images, run_module: Callable[..., ModuleResult]
) -> None:
    facts = facts_of(run_module(FQCN, {"device": str(images.written)}))
    a, b = facts["slots"]["A"], facts["slots"]["B"]
    assert (a["version"], a["pretty_name"], a["os_release"]["ID"]) == ("1.0", "KubeOS 1.0", "kubeos")
    assert (b["version"], b["pretty_name"]) == ("2.0", "KubeOS 2.0")
    for info in (a, b):
        assert (info["has_kernel"], info["has_initrd"], info["marked_bootable"], info["bootable"]) == (
            True,
            True,
            True,
            True,
        )
    # The raw image came labelled "rootfs": the slot keeps the label the layout relies on.
    assert b["label"] == "ROOT-B"
    assert (facts["active_slot"], facts["active_source"]) == ("A", "committed")
    assert loop_devices_of(images.written) == []


@pytest.mark.parametrize(
    ("how", "slot"),
    [("PARTUUID of ROOT-B", "B"), ("LABEL=ROOT-A", "A")],
    ids=["partuuid-names-b", "label-names-a"],
)
def test_stated_running_root_makes_its_slot_the_active_one(
    how: str, slot: str, images: Images, run_module: Callable[..., ModuleResult]
) -> None:
    running_root = f"PARTUUID={partuuid(images.written, 'ROOT-B')}" if how.startswith("PARTUUID") else how
    facts = facts_of(run_module(FQCN, {"device": str(images.written), "running_root": running_root}))
    assert facts["running_root"] == running_root
    assert facts["running_slot"] == slot
    assert (facts["active_slot"], facts["inactive_slot"]) == (slot, "A" if slot == "B" else "B")
    assert facts["active_source"] == "running-root"


def test_running_root_on_another_disk_leaves_no_running_slot(
    images: Images, image_file: Callable[..., Path], run_module: Callable[..., ModuleResult]
) -> None:
    other = image_file("other.img", 64)
    subprocess.run(["sfdisk", "--quiet", str(other)], input=b"label: gpt\n,,L\n", check=True)
    with attached(other) as disk:
        root = wait_for(f"{disk}p1")
        for running_root in (root, f"PARTUUID={sfdisk_json(str(other))['partitions'][0]['uuid']}"):
            facts = facts_of(run_module(FQCN, {"device": str(images.written), "running_root": running_root}))
            assert facts["running_root"] == running_root
            assert facts["running_slot"] is None
            assert (facts["active_slot"], facts["active_source"]) == ("A", "committed")


def test_kubeos_built_disk_is_recognised_as_legacy_with_its_saved_entry(
    image_file: Callable[..., Path], run_module: Callable[..., ModuleResult], tmp_path: Path
) -> None:
    image = image_file("kubeos-built.img", 256)
    script = (
        "label: gpt\n"
        'size=64MiB, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name="BOOT"\n'
        'size=64MiB, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name="ROOT-A"\n'
        'size=64MiB, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name="ROOT-B"\n'
        'type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name="PERSIST"\n'
    )
    subprocess.run(["sfdisk", "--quiet", str(image)], input=script.encode(), check=True)
    env = tmp_path / "grubenv"
    subprocess.run(["grub-editenv", str(env), "create"], check=True)
    subprocess.run(["grub-editenv", str(env), "set", "saved_entry=B"], check=True)
    with attached(image) as disk:
        boot = wait_for(f"{disk}p1")
        subprocess.run(["mkfs.vfat", "-n", "BOOT", boot], check=True, capture_output=True)
        for number, label in ((2, "ROOT-A"), (3, "ROOT-B"), (4, "PERSIST")):
            subprocess.run(["mkfs.ext4", "-q", "-F", "-L", label, wait_for(f"{disk}p{number}")], check=True)
        for directory in ("::/EFI", "::/EFI/openEuler"):
            subprocess.run(["mmd", "-i", boot, directory], check=True, env=MTOOLS_ENV)
        subprocess.run(["mcopy", "-i", boot, str(env), "::/EFI/openEuler/grubenv"], check=True, env=MTOOLS_ENV)

    facts = facts_of(run_module(FQCN, {"device": str(image)}))

    assert facts["layout"] == "kubeos-legacy"
    assert facts["grub"]["default"] == "B"
    assert facts["grub"]["env"]["saved_entry"] == "B"
    assert (facts["active_slot"], facts["active_source"], facts["inactive_slot"]) == ("B", "committed", "A")
    assert facts["esp"] is None
    assert facts["boot"]["fstype"] == "vfat"
    assert {s: facts["slots"][s]["label"] for s in ("A", "B")} == {"A": "ROOT-A", "B": "ROOT-B"}
    assert loop_devices_of(image) == []


def test_disk_that_is_not_kubeos_fails_saying_to_run_disk_layout(
    image_file: Callable[..., Path], run_module: Callable[..., ModuleResult]
) -> None:
    image = image_file("foreign.img", 64)
    subprocess.run(["sfdisk", "--quiet", str(image)], input=b"label: gpt\n,,L\n", check=True)
    res = run_module(FQCN, {"device": str(image)})
    assert res.failed
    assert "does not hold a kubeos layout" in res.msg
    assert "kubeos.os.disk_layout" in res.msg
    assert "ansible_facts" not in res.result or not res.result["ansible_facts"].get("kubeos")
    assert loop_devices_of(image) == []
