"""kubeos.os.boot_slot on disk images: trial boots, commits and rollbacks in the real GRUB environment.

Images are made once per module by the real modules (a fresh layout, then slot B written, then slot A
too) and copied for every test, which works on its own copy. The GRUB environment is read back with
the real ``grub-editenv`` from BOOT mounted read-only.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
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
FQCN = "kubeos.os.boot_slot"

pytestmark = pytest.mark.loop


def run_once(workdir: Path, fqcn: str, args: dict[str, Any]) -> dict[str, Any]:
    """One successful real module run outside a test function (for module-scoped fixtures)."""
    res = run_module_once(workdir, fqcn, args)
    assert not res.failed, f"{fqcn} failed:\n{res.stdout}"
    return res.result


# --- reading and editing BOOT without the module ----------------------------------------------------------


@contextlib.contextmanager
def mounted_boot(image: Path, *, readonly: bool = True) -> Iterator[Path]:
    """BOOT of ``image`` mounted on a private directory through a loop device over just that partition."""
    entry = next(p for p in sfdisk_json(str(image))["partitions"] if p["name"] == "BOOT")
    argv = ["losetup", "--find", "--show", "--offset", str(entry["start"] * 512), "--sizelimit"]
    argv += [str(entry["size"] * 512), *(["--read-only"] if readonly else []), str(image)]
    device = subprocess.run(argv, capture_output=True, text=True, check=True).stdout.strip()
    target = tempfile.mkdtemp(prefix="kubeos-test-mnt-")
    try:
        subprocess.run(["mount", "-t", "ext4", "-o", "ro,noload" if readonly else "rw", device, target], check=True)
        try:
            yield Path(target)
        finally:
            subprocess.run(["umount", target], check=True)
    finally:
        os.rmdir(target)
        subprocess.run(["losetup", "--detach", device], check=False)


def grubenv_bytes(image: Path) -> bytes:
    with mounted_boot(image) as boot:
        return (boot / "grub/grubenv").read_bytes()


def grubenv_list(image: Path) -> dict[str, str]:
    """The variables as the real ``grub-editenv FILE list`` prints them."""
    with mounted_boot(image) as boot:
        out = subprocess.run(
            ["grub-editenv", str(boot / "grub/grubenv"), "list"], capture_output=True, text=True, check=True
        ).stdout
    return dict(line.split("=", 1) for line in out.splitlines())


# --- images made once per module ---------------------------------------------------------------------------


@dataclass
class Templates:
    laid_out: Path  # fresh layout: both slots empty, kubeos_default=A
    b_written: Path  # an OS (2.0, raw image) in slot B; A still empty
    ab_written: Path  # and an OS (1.0, tar) in slot A
    tar: Path
    tar_sha256: str


@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Templates]:
    if os.geteuid() != 0:
        pytest.skip("needs root (loop devices, mkfs, mount)")
    base = tmp_path_factory.mktemp("boot-slot")
    laid_out, b_written, ab_written = base / "laid-out.img", base / "b.img", base / "ab.img"
    with open(laid_out, "wb") as handle:
        handle.truncate(SIZE_MIB * MIB)
    try:
        run_once(base / "r1", "kubeos.os.disk_layout", {"device": str(laid_out), "root_size": ROOT_SIZE})
        raw = base / "os-2.0.ext4"
        raw_sha = make_ext4_image(make_os_tree(base / "tree-2.0", "2.0"), raw, size_mib=32)
        tar = base / "os-1.0.tar"
        tar_sha = make_tar(make_os_tree(base / "tree-1.0", "1.0"), tar)
        copy_sparse(laid_out, b_written)
        args = {"device": str(b_written), "slot": "B", "src": f"file://{raw}", "sha256": raw_sha, "format": "raw"}
        run_once(base / "r2", "kubeos.os.slot_write", args)
        copy_sparse(b_written, ab_written)
        args = {"device": str(ab_written), "slot": "A", "src": f"file://{tar}", "sha256": tar_sha, "format": "tar"}
        run_once(base / "r3", "kubeos.os.slot_write", args)
        yield Templates(laid_out, b_written, ab_written, tar, tar_sha)
    finally:
        for image in (laid_out, b_written, ab_written):
            detach_all(image)


@pytest.fixture
def copy_of(templates: Templates, image_file: Callable[..., Path]) -> Callable[[str], Path]:
    """A private copy of one of the templates (by attribute name)."""

    def copy(which: str) -> Path:
        target = image_file(f"{which}.img", SIZE_MIB)
        copy_sparse(getattr(templates, which), target)
        return target

    return copy


# --- tests ---------------------------------------------------------------------------------------------------


def test_trial_on_a_fresh_disk_is_refused_and_leaves_grubenv_untouched(
    copy_of: Callable[[str], Path], run_module: Callable[..., ModuleResult]
) -> None:
    image = copy_of("laid_out")
    before = grubenv_bytes(image)
    res = run_module(FQCN, {"device": str(image), "state": "trial"})
    assert res.failed
    assert "refusing to arm a trial boot of slot B" in res.msg
    assert "slot B is marked not bootable" in res.msg
    assert "kubeos.os.slot_write" in res.msg
    assert grubenv_bytes(image) == before
    assert loop_devices_of(image) == []


def test_trial_arms_the_written_slot_with_three_tries_once(
    copy_of: Callable[[str], Path], run_module: Callable[..., ModuleResult]
) -> None:
    image = copy_of("b_written")
    res = run_module(FQCN, {"device": str(image), "state": "trial"}, diff=True)
    assert not res.failed, res.msg
    assert res.changed
    assert res.result["slot"] == "B"
    env = grubenv_list(image)
    assert (env["kubeos_trial"], env["kubeos_tries"], env["kubeos_default"]) == ("B", "3", "A")
    assert "kubeos_trial=" not in res.result["diff"]["before"]
    assert "kubeos_trial=B\n" in res.result["diff"]["after"]
    assert "kubeos_tries=3\n" in res.result["diff"]["after"]
    assert res.result["grub"]["trial"] == "B" and res.result["grub"]["tries"] == 3
    armed = grubenv_bytes(image)

    again = run_module(FQCN, {"device": str(image), "state": "trial"}, diff=True)

    assert not again.failed, again.msg
    assert not again.changed
    assert "diff" not in again.result
    assert grubenv_bytes(image) == armed
    assert loop_devices_of(image) == []


def test_trial_honours_the_number_of_tries(
    copy_of: Callable[[str], Path], run_module: Callable[..., ModuleResult]
) -> None:
    image = copy_of("b_written")
    res = run_module(FQCN, {"device": str(image), "state": "trial", "slot": "B", "tries": 5})
    assert not res.failed, res.msg
    assert grubenv_list(image)["kubeos_tries"] == "5"
    assert "up to 5 times" in res.result["message"]


def test_commit_on_a_disk_that_is_not_running_commits_the_trial_slot(
    copy_of: Callable[[str], Path], run_module: Callable[..., ModuleResult]
) -> None:
    image = copy_of("b_written")
    assert not run_module(FQCN, {"device": str(image), "state": "trial"}).failed
    res = run_module(FQCN, {"device": str(image), "state": "committed"})
    assert not res.failed, res.msg
    assert res.changed and res.result["slot"] == "B"
    env = grubenv_list(image)
    assert env["kubeos_default"] == "B"
    assert "kubeos_trial" not in env and "kubeos_tries" not in env
    assert loop_devices_of(image) == []


def test_rollback_to_slot_a_needs_an_os_in_slot_a(
    copy_of: Callable[[str], Path], templates: Templates, run_module: Callable[..., ModuleResult]
) -> None:
    image = copy_of("b_written")
    assert not run_module(FQCN, {"device": str(image), "state": "committed", "slot": "B"}).failed
    assert grubenv_list(image)["kubeos_default"] == "B"
    committed_b = grubenv_bytes(image)

    refused = run_module(FQCN, {"device": str(image), "state": "rollback"})

    assert refused.failed
    assert "refusing to roll back to slot A: slot A is marked not bootable" in refused.msg
    assert grubenv_bytes(image) == committed_b
    assert loop_devices_of(image) == []

    write = {"device": str(image), "src": f"file://{templates.tar}", "sha256": templates.tar_sha256, "format": "tar"}
    written = run_module("kubeos.os.slot_write", write)
    assert not written.failed, written.msg
    assert written.result["slot"] == "A"

    res = run_module(FQCN, {"device": str(image), "state": "rollback"})

    assert not res.failed, res.msg
    assert res.changed and res.result["slot"] == "A"
    env = grubenv_list(image)
    assert env["kubeos_default"] == "A"
    assert "kubeos_trial" not in env
    assert loop_devices_of(image) == []


def test_committing_a_slot_other_than_the_running_one_is_refused(
    copy_of: Callable[[str], Path], run_module: Callable[..., ModuleResult]
) -> None:
    image = copy_of("ab_written")
    before = grubenv_bytes(image)
    res = run_module(FQCN, {"device": str(image), "state": "committed", "slot": "B", "running_root": "LABEL=ROOT-A"})
    assert res.failed
    assert "refusing to commit slot B: the system runs slot A" in res.msg
    assert "state=rollback" in res.msg
    assert grubenv_bytes(image) == before
    assert loop_devices_of(image) == []


def test_check_mode_reports_the_trial_and_writes_nothing(
    copy_of: Callable[[str], Path], run_module: Callable[..., ModuleResult]
) -> None:
    image = copy_of("b_written")
    before = sha256_of(str(image))
    res = run_module(FQCN, {"device": str(image), "state": "trial"}, check=True, diff=True)
    assert not res.failed, res.msg
    assert res.changed
    assert "kubeos_trial=B\n" in res.result["diff"]["after"]
    assert sha256_of(str(image)) == before
    assert "kubeos_trial" not in grubenv_list(image)
    assert loop_devices_of(image) == []


def test_grubenv_written_by_the_module_stays_editable_by_grub_editenv_and_readable_by_slot_info(
    copy_of: Callable[[str], Path], run_module: Callable[..., ModuleResult]
) -> None:
    image = copy_of("b_written")
    assert not run_module(FQCN, {"device": str(image), "state": "trial", "tries": 2}).failed
    with mounted_boot(image, readonly=False) as boot:
        env_file = boot / "grub/grubenv"
        assert env_file.stat().st_size == 1024
        subprocess.run(
            ["grub-editenv", str(env_file), "set", "kubeos_B_cmdline=console=ttyS0 quiet", "site=lab 3"], check=True
        )
        subprocess.run(["grub-editenv", str(env_file), "unset", "kubeos_A_bootable"], check=True)
        assert env_file.stat().st_size == 1024

    res = run_module("kubeos.os.slot_info", {"device": str(image)})

    assert not res.failed, res.msg
    grub = res.result["kubeos"]["grub"]
    assert (grub["default"], grub["trial"], grub["tries"]) == ("A", "B", 2)
    assert grub["env"]["kubeos_B_cmdline"] == "console=ttyS0 quiet"
    assert grub["env"]["site"] == "lab 3"
    assert "kubeos_A_bootable" not in grub["env"]
    assert grub["env"] == grubenv_list(image)
    assert loop_devices_of(image) == []
