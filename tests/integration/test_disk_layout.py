"""kubeos.os.disk_layout against sparse disk images, with the real sfdisk, mkfs, blkid, mtools and GRUB tools.

The module attaches and detaches its own loop device for an image file. The tests read the result
without the module's help: ``sfdisk --json`` on the image file, ``blkid`` and ``mount`` on loop
devices limited to one partition (offset + size), ``mcopy -i IMAGE@@OFFSET`` for the ESP (this
kernel cannot mount vfat).
"""

from __future__ import annotations

import contextlib
import itertools
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
    blkid,
    copy_sparse,
    detach_all,
    loop_devices_of,
    run_module_once,
    sfdisk_json,
    sha256_of,
)

from ansible_collections.kubeos.os.plugins.module_utils import grubcfg

MIB = 1024 * 1024
SIZE_MIB = 300  # 64 ESP + 64 BOOT + 2 x 64 slots + PERSIST + 2
ROOT_SIZE = "64MiB"
FQCN = "kubeos.os.disk_layout"
GPT_ESP = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
GPT_BIOS = "21686148-6449-6E6F-744E-656564454649"
GPT_LINUX = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
NAMES = ["ESP", "BOOT", "ROOT-A", "ROOT-B", "PERSIST"]
MTOOLS_ENV = {**os.environ, "MTOOLS_SKIP_CHECK": "1", "LC_ALL": "C"}

pytestmark = pytest.mark.loop


# --- reading an image without the module -------------------------------------------------------------


def partitions(image: Path) -> dict[str, dict[str, Any]]:
    """The image's GPT entries by name (start and size in 512-byte sectors)."""
    table = sfdisk_json(str(image))
    assert table["label"] == "gpt"
    return {entry["name"]: entry for entry in table["partitions"]}


@contextlib.contextmanager
def partition_loop(image: Path, name: str, *, readonly: bool = True) -> Iterator[str]:
    """A loop device showing just one partition of ``image``; detached again afterwards."""
    entry = partitions(image)[name]
    argv = ["losetup", "--find", "--show", "--offset", str(entry["start"] * 512)]
    argv += ["--sizelimit", str(entry["size"] * 512)]
    if readonly:
        argv.append("--read-only")
    device = subprocess.run([*argv, str(image)], capture_output=True, text=True, check=True).stdout.strip()
    try:
        yield device
    finally:
        subprocess.run(["losetup", "--detach", device], check=False)


@contextlib.contextmanager
def mounted(image: Path, name: str, *, readonly: bool = True) -> Iterator[Path]:
    """An ext4 partition of ``image`` mounted on a private temporary directory."""
    with partition_loop(image, name, readonly=readonly) as device:
        target = tempfile.mkdtemp(prefix="kubeos-test-mnt-")
        options = "ro,noload" if readonly else "rw"
        try:
            subprocess.run(["mount", "-t", "ext4", "-o", options, device, target], check=True)
            try:
                yield Path(target)
            finally:
                subprocess.run(["umount", target], check=True)
        finally:
            os.rmdir(target)


def fs_of(image: Path, name: str) -> dict[str, str]:
    with partition_loop(image, name) as device:
        return blkid(device)


def esp_file(image: Path, path: str) -> bytes:
    offset = partitions(image)["ESP"]["start"] * 512
    res = subprocess.run(
        ["mcopy", "-n", "-i", f"{image}@@{offset}", f"::{path}", "-"], capture_output=True, env=MTOOLS_ENV, check=True
    )
    return res.stdout


def script_check(path: Path) -> None:
    res = subprocess.run(["grub-script-check", str(path)], capture_output=True, text=True, check=False)
    assert res.returncode == 0, f"grub-script-check {path}: {res.stdout}{res.stderr}"


def editenv_list(path: Path) -> dict[str, str]:
    out = subprocess.run(["grub-editenv", str(path), "list"], capture_output=True, text=True, check=True).stdout
    return dict(line.split("=", 1) for line in out.splitlines())


def assert_detached(image: Path) -> None:
    left = loop_devices_of(image)
    assert left == [], f"loop devices left attached over {image}: {left}"


def is_all_zeros(image: Path) -> bool:
    with open(image, "rb") as handle:
        for chunk in iter(lambda: handle.read(8 * MIB), b""):
            if chunk.count(0) != len(chunk):
                return False
    return True


# --- one laid-out image, shared read-only by the tests that only look at it -------------------------------


def run_once(workdir: Path, args: dict[str, Any], *, diff: bool = False) -> ModuleResult:
    """One real module run outside a test function (for module-scoped fixtures)."""
    return run_module_once(workdir, FQCN, args, diff=diff)


@dataclass
class LaidOut:
    image: Path
    result: ModuleResult


@pytest.fixture(scope="module")
def laid_out(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LaidOut]:
    """A fresh image laid out once by the module (diff mode on); tests only read it or copy it."""
    if os.geteuid() != 0:
        pytest.skip("needs root (loop devices, mkfs, mount)")
    base = tmp_path_factory.mktemp("laid-out")
    image = base / "disk.img"
    with open(image, "wb") as handle:
        handle.truncate(SIZE_MIB * MIB)
    try:
        result = run_once(base / "runner", {"device": str(image), "root_size": ROOT_SIZE}, diff=True)
        assert not result.failed, result.msg
        yield LaidOut(image, result)
    finally:
        detach_all(image)


@pytest.fixture
def laid_out_copy(laid_out: LaidOut, image_file: Callable[..., Path]) -> Path:
    """A private copy of the laid-out image, for tests that change it."""
    return copy_sparse(laid_out.image, image_file("copy.img", SIZE_MIB))


def test_fresh_image_gets_gpt_esp_boot_two_slots_and_persist(laid_out: LaidOut) -> None:
    assert laid_out.result.changed
    assert laid_out.result.result["actions"][0].startswith("partition /dev/loop")
    table = sfdisk_json(str(laid_out.image))
    assert table["label"] == "gpt"
    parts = table["partitions"]
    assert [p["name"] for p in parts] == NAMES
    assert [p["type"] for p in parts] == [GPT_ESP, GPT_LINUX, GPT_LINUX, GPT_LINUX, GPT_LINUX]
    assert [p["size"] for p in parts[:4]] == [64 * 2048] * 4
    assert parts[0]["start"] == 2048
    for before, after in itertools.pairwise(parts):
        assert after["start"] == before["start"] + before["size"], "partitions leave gaps"
    persist = parts[-1]
    persist_end = (persist["start"] + persist["size"]) * 512
    assert persist["size"] * 512 >= 16 * MIB
    assert persist_end > SIZE_MIB * MIB - 2 * MIB, "PERSIST does not take the rest of the disk"
    assert_detached(laid_out.image)


def test_fresh_image_filesystems_carry_the_partition_names_as_labels(laid_out: LaidOut) -> None:
    found = {name: fs_of(laid_out.image, name) for name in NAMES}
    assert (found["ESP"]["TYPE"], found["ESP"]["LABEL"]) == ("vfat", "ESP")
    for name in NAMES[1:]:
        assert (found[name]["TYPE"], found[name]["LABEL"]) == ("ext4", name)
    returned = {p["partlabel"]: p for p in laid_out.result.result["partitions"]}
    assert {name: returned[name]["fsuuid"] for name in NAMES} == {name: found[name]["UUID"] for name in NAMES}


def test_esp_holds_the_grub_efi_loader_that_grub_mkimage_builds(laid_out: LaidOut, tmp_path: Path) -> None:
    # The modules the boot test on OVMF needs (DESIGN.md) must all be built in.
    needed = "part_gpt fat ext2 normal search search_label configfile linux echo loadenv test gzio all_video efi_gop"
    assert set(needed.split()) <= set(grubcfg.EFI_MODULES)
    fresh = tmp_path / "BOOTX64.EFI"
    subprocess.run(
        ["grub-mkimage", "-O", "x86_64-efi", "-p", "/EFI/BOOT", "-o", str(fresh), *grubcfg.EFI_MODULES], check=True
    )
    on_esp = esp_file(laid_out.image, "/EFI/BOOT/BOOTX64.EFI")
    assert len(on_esp) == fresh.stat().st_size
    assert on_esp == fresh.read_bytes()


def test_esp_config_hands_over_to_boot_by_its_filesystem_uuid(laid_out: LaidOut, tmp_path: Path) -> None:
    boot_uuid = fs_of(laid_out.image, "BOOT")["UUID"]
    config = esp_file(laid_out.image, "/EFI/BOOT/grub.cfg").decode()
    assert f"search --no-floppy --fs-uuid --set=kubeos_bootfs {boot_uuid}\n" in config
    assert "search --no-floppy --label --set=kubeos_bootfs BOOT\n" in config
    assert "configfile ($root)/grub/grub.cfg" in config
    (tmp_path / "esp.cfg").write_text(config)
    script_check(tmp_path / "esp.cfg")


def test_boot_menu_passes_grub_script_check_and_boots_both_slots_by_partuuid(laid_out: LaidOut) -> None:
    parts = partitions(laid_out.image)
    with mounted(laid_out.image, "BOOT") as boot:
        script_check(boot / "grub/grub.cfg")
        menu = (boot / "grub/grub.cfg").read_text()
    for slot, number in (("A", 3), ("B", 4)):
        partuuid = parts[f"ROOT-{slot}"]["uuid"].lower()
        entry = menu.split(f'menuentry "kubeos slot {slot}"', 1)[1].split("\n}\n", 1)[0]
        assert f'set root="($kubeos_disk,gpt{number})"' in entry
        assert f"root=PARTUUID={partuuid} ro kubeos.slot={slot}" in entry


def test_boot_grubenv_commits_slot_a_and_marks_the_empty_slots_not_bootable(laid_out: LaidOut) -> None:
    with mounted(laid_out.image, "BOOT") as boot:
        env = editenv_list(boot / "grub/grubenv")
        size = (boot / "grub/grubenv").stat().st_size
    assert env["kubeos_default"] == "A"
    assert (env["kubeos_A_bootable"], env["kubeos_B_bootable"]) == ("no", "no")
    assert "kubeos_trial" not in env
    assert size == 1024


def test_diff_mode_shows_the_partition_table_before_and_after(laid_out: LaidOut) -> None:
    diff = laid_out.result.result["diff"]
    assert "no partition table" in diff["before"]
    assert "gpt" in diff["after"]
    lines = diff["after"].splitlines()[1:]
    assert [line.split()[1] for line in lines] == NAMES
    assert "1: ESP 64 MiB vfat ESP" in diff["after"]
    assert "3: ROOT-A 64 MiB ext4 ROOT-A" in diff["after"]


# --- runs that change (or must not change) an image ----------------------------------------------------


def test_second_run_on_a_laid_out_disk_changes_nothing(
    laid_out_copy: Path, run_module: Callable[..., ModuleResult]
) -> None:
    before = sha256_of(str(laid_out_copy))
    res = run_module(FQCN, {"device": str(laid_out_copy), "root_size": ROOT_SIZE})
    assert not res.failed, res.msg
    assert not res.changed
    assert res.result["actions"] == []
    assert sha256_of(str(laid_out_copy)) == before
    assert_detached(laid_out_copy)


def test_check_mode_on_a_fresh_image_reports_the_layout_and_writes_nothing(
    image_file: Callable[..., Path], run_module: Callable[..., ModuleResult]
) -> None:
    image = image_file("fresh.img", SIZE_MIB)
    res = run_module(FQCN, {"device": str(image), "root_size": ROOT_SIZE}, check=True, diff=True)
    assert not res.failed, res.msg
    assert res.changed
    assert res.result["actions"][0].startswith("partition ")
    assert "will partition" in res.result["diff"]["after"]
    assert is_all_zeros(image)
    assert subprocess.run(["sfdisk", "--json", str(image)], capture_output=True, check=False).stdout.strip() == b""
    assert_detached(image)


def test_bios_boot_puts_a_one_mib_bios_partition_first(
    image_file: Callable[..., Path], run_module: Callable[..., ModuleResult]
) -> None:
    image = image_file("bios.img", SIZE_MIB)
    res = run_module(FQCN, {"device": str(image), "root_size": ROOT_SIZE, "bios_boot": True})
    assert not res.failed, res.msg
    parts = sfdisk_json(str(image))["partitions"]
    assert [p["name"] for p in parts] == ["BIOS", *NAMES]
    assert (parts[0]["start"], parts[0]["size"], parts[0]["type"]) == (2048, 2048, GPT_BIOS)
    assert parts[1]["start"] == 4096
    with mounted(image, "BOOT") as boot:
        menu = (boot / "grub/grub.cfg").read_text()
    assert 'set root="($kubeos_disk,gpt4)"' in menu.split('menuentry "kubeos slot A"', 1)[1].split("}")[0]
    assert 'set root="($kubeos_disk,gpt5)"' in menu.split('menuentry "kubeos slot B"', 1)[1].split("}")[0]
    assert_detached(image)


def test_persist_size_is_honoured_and_the_rest_of_the_disk_stays_free(
    image_file: Callable[..., Path], run_module: Callable[..., ModuleResult]
) -> None:
    image = image_file("persist.img", 360)
    res = run_module(FQCN, {"device": str(image), "root_size": ROOT_SIZE, "persist_size": "32MiB"})
    assert not res.failed, res.msg
    table = sfdisk_json(str(image))
    persist = table["partitions"][-1]
    assert (persist["name"], persist["size"]) == ("PERSIST", 32 * 2048)
    assert table["lastlba"] - (persist["start"] + persist["size"]) > 60 * 2048
    assert fs_of(image, "PERSIST")["LABEL"] == "PERSIST"
    assert_detached(image)


def _holding_ext4(image: Path) -> None:
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "data", str(image)], check=True)


def _holding_foreign_table(image: Path) -> None:
    subprocess.run(["sfdisk", "--quiet", str(image)], input=b"label: gpt\n,,L\n", check=True)


HOLDING_DATA = {"whole-disk-ext4": _holding_ext4, "foreign-partition-table": _holding_foreign_table}


@pytest.mark.parametrize("prepare", HOLDING_DATA.values(), ids=HOLDING_DATA.keys())
def test_disk_holding_data_is_refused_without_force_and_left_untouched(
    prepare: Callable[[Path], None], image_file: Callable[..., Path], run_module: Callable[..., ModuleResult]
) -> None:
    image = image_file("data.img", SIZE_MIB)
    prepare(image)
    before = sha256_of(str(image))
    res = run_module(FQCN, {"device": str(image), "root_size": ROOT_SIZE})
    assert res.failed
    assert "force: true" in res.msg
    assert "Nothing was changed" in res.msg
    assert sha256_of(str(image)) == before
    assert_detached(image)


@pytest.mark.parametrize("prepare", HOLDING_DATA.values(), ids=HOLDING_DATA.keys())
def test_force_lays_out_a_disk_holding_data_anew(
    prepare: Callable[[Path], None], image_file: Callable[..., Path], run_module: Callable[..., ModuleResult]
) -> None:
    image = image_file("data.img", SIZE_MIB)
    prepare(image)
    res = run_module(FQCN, {"device": str(image), "root_size": ROOT_SIZE, "force": True})
    assert not res.failed, res.msg
    assert res.changed
    assert [p["name"] for p in sfdisk_json(str(image))["partitions"]] == NAMES
    whole = subprocess.run(
        ["blkid", "--probe", "--output", "export", str(image)], capture_output=True, text=True, check=False
    ).stdout
    assert "PTTYPE=gpt" in whole and "TYPE=ext4" not in whole.replace("PTTYPE", "")
    assert fs_of(image, "PERSIST")["TYPE"] == "ext4"
    assert_detached(image)


def test_kubeos_disk_of_other_sizes_is_refused_without_force(
    laid_out_copy: Path, run_module: Callable[..., ModuleResult]
) -> None:
    before = sha256_of(str(laid_out_copy))
    res = run_module(FQCN, {"device": str(laid_out_copy), "root_size": "72MiB"})
    assert res.failed
    assert "kubeos layout of other sizes" in res.msg
    assert "ROOT-A is 64 MiB, wanted 72 MiB" in res.msg
    assert "force: true" in res.msg
    assert sha256_of(str(laid_out_copy)) == before
    assert_detached(laid_out_copy)


def test_deleted_boot_menu_is_rewritten_while_persist_and_slots_keep_their_files(
    laid_out: LaidOut, laid_out_copy: Path, run_module: Callable[..., ModuleResult]
) -> None:
    with mounted(laid_out.image, "BOOT") as boot:
        original_menu = (boot / "grub/grub.cfg").read_text()
    with mounted(laid_out_copy, "BOOT", readonly=False) as boot:
        (boot / "grub/grub.cfg").unlink()
        env_before = (boot / "grub/grubenv").read_bytes()
    with mounted(laid_out_copy, "PERSIST", readonly=False) as persist:
        (persist / "kubeos-test").mkdir()
        (persist / "kubeos-test/keep.txt").write_text("node data\n")
    with mounted(laid_out_copy, "ROOT-A", readonly=False) as root_a:
        (root_a / "marker").write_text("slot A\n")

    res = run_module(FQCN, {"device": str(laid_out_copy), "root_size": ROOT_SIZE})

    assert not res.failed, res.msg
    assert res.changed
    assert res.result["actions"] == ["write grub/grub.cfg on BOOT"]
    with mounted(laid_out_copy, "BOOT") as boot:
        assert (boot / "grub/grub.cfg").read_text() == original_menu
        script_check(boot / "grub/grub.cfg")
        assert (boot / "grub/grubenv").read_bytes() == env_before
    with mounted(laid_out_copy, "PERSIST") as persist:
        assert (persist / "kubeos-test/keep.txt").read_text() == "node data\n"
    with mounted(laid_out_copy, "ROOT-A") as root_a:
        assert (root_a / "marker").read_text() == "slot A\n"
    assert_detached(laid_out_copy)


def test_disk_with_a_mounted_partition_is_refused_even_with_force(
    laid_out_copy: Path, run_module: Callable[..., ModuleResult]
) -> None:
    before = sha256_of(str(laid_out_copy))
    disk = subprocess.run(
        ["losetup", "--find", "--show", str(laid_out_copy)], capture_output=True, text=True, check=True
    ).stdout.strip()
    target = tempfile.mkdtemp(prefix="kubeos-test-mnt-")
    try:
        subprocess.run(["partx", "--update", disk], check=False)
        subprocess.run(["mount", "-t", "ext4", "-o", "ro,noload", f"{disk}p5", target], check=True)
        try:
            res = run_module(FQCN, {"device": disk, "root_size": "72MiB", "force": True})
        finally:
            subprocess.run(["umount", target], check=True)
    finally:
        os.rmdir(target)
        subprocess.run(["losetup", "--detach", disk], check=True)
    assert res.failed
    assert f"{disk}p5 is mounted at {target}" in res.msg
    assert "in use" in res.msg
    assert sha256_of(str(laid_out_copy)) == before
    assert_detached(laid_out_copy)


def test_image_file_whose_partition_is_mounted_elsewhere_is_refused_even_with_force(
    laid_out_copy: Path, run_module: Callable[..., ModuleResult]
) -> None:
    """The image is in use through another loop device (``mount -o loop,offset=…``): the module's own
    loop device shows no mount, but erasing the file would pull the filesystem from under the mount."""
    before = sha256_of(str(laid_out_copy))
    with mounted(laid_out_copy, "PERSIST") as persist:
        res = run_module(FQCN, {"device": str(laid_out_copy), "root_size": "72MiB", "force": True})
        holder = loop_devices_of(laid_out_copy)
        assert persist.is_dir()
    assert res.failed, f"re-laid an image whose PERSIST was mounted at {persist}: {res.result.get('actions')}"
    assert "mounted" in res.msg or "in use" in res.msg
    assert len(holder) == 1, f"the module left its loop device attached: {holder}"
    assert sha256_of(str(laid_out_copy)) == before
    assert_detached(laid_out_copy)
