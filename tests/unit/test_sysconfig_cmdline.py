"""grub.cmdline.current / grub.cmdline.next: the per-slot kernel arguments in the GRUB environment."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sysconfig_tree import FakeBootEnv, configure, contents

from ansible_collections.kubeos.os.plugins.module_utils import grubenv
from ansible_collections.kubeos.os.plugins.module_utils.sysconfig import models


def args(model: str, *items: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"model": model, "contents": list(items)}]


@pytest.fixture
def disk() -> FakeBootEnv:
    return FakeBootEnv(
        env={"kubeos_default": "A", "kubeos_A_cmdline": "quiet loglevel=3", "kubeos_B_bootable": "yes"}, current="A"
    )


def test_next_edits_the_other_slot_and_current_the_running_one(tmp_path: Path, disk: FakeBootEnv) -> None:
    nxt = configure(
        tmp_path, args("grub.cmdline.next", {"key": "kubeos.testarg", "value": 1}, {"key": "debug"}), grub=disk
    )
    assert disk.env["kubeos_B_cmdline"] == "kubeos.testarg=1 debug"
    assert disk.env["kubeos_A_cmdline"] == "quiet loglevel=3"
    assert nxt.entries[0].slot == "B" and nxt.entries[0].target == "GRUB environment kubeos_B_cmdline"
    configure(tmp_path, args("grub.cmdline.current", {"key": "loglevel", "value": 7}), grub=disk)
    assert disk.env["kubeos_A_cmdline"] == "quiet loglevel=7"
    assert disk.env["kubeos_B_cmdline"] == "kubeos.testarg=1 debug"
    assert list(disk.env) == ["kubeos_default", "kubeos_A_cmdline", "kubeos_B_bootable", "kubeos_B_cmdline"]


def test_key_value_becomes_a_bare_key_and_back_in_one_step(tmp_path: Path, disk: FakeBootEnv) -> None:
    result = configure(tmp_path, args("grub.cmdline.current", {"key": "loglevel", "value": ""}), grub=disk)
    assert disk.env["kubeos_A_cmdline"] == "quiet loglevel"
    assert contents(result) == [
        {"key": "loglevel", "operation": "set", "before": "loglevel=3", "after": "loglevel", "changed": True}
    ]
    configure(
        tmp_path,
        args("grub.cmdline.current", {"key": "quiet", "value": "1"}, {"key": "loglevel", "value": None}),
        grub=disk,
    )
    assert disk.env["kubeos_A_cmdline"] == "quiet=1 loglevel"


def test_delete_without_a_value_removes_every_form_with_one_only_that_value(tmp_path: Path, disk: FakeBootEnv) -> None:
    disk.env["kubeos_A_cmdline"] = "quiet console=ttyS0 console=tty0 loglevel=3"
    kept = configure(
        tmp_path, args("grub.cmdline.current", {"key": "loglevel", "value": 4, "operation": "delete"}), grub=disk
    )
    assert not kept.changed and "does not have the value '4'" in contents(kept)[0]["note"]
    configure(
        tmp_path, args("grub.cmdline.current", {"key": "console", "value": "tty0", "operation": "delete"}), grub=disk
    )
    assert disk.env["kubeos_A_cmdline"] == "quiet console=ttyS0 loglevel=3"
    configure(
        tmp_path,
        args(
            "grub.cmdline.current", {"key": "console", "operation": "delete"}, {"key": "quiet", "operation": "delete"}
        ),
        grub=disk,
    )
    assert disk.env["kubeos_A_cmdline"] == "loglevel=3"


def test_removing_the_last_argument_unsets_the_variable(tmp_path: Path, disk: FakeBootEnv) -> None:
    configure(
        tmp_path,
        args(
            "grub.cmdline.current", {"key": "quiet", "operation": "delete"}, {"key": "loglevel", "operation": "delete"}
        ),
        grub=disk,
    )
    assert "kubeos_A_cmdline" not in disk.env


def test_setting_a_key_twice_leaves_one_occurrence(tmp_path: Path, disk: FakeBootEnv) -> None:
    disk.env["kubeos_A_cmdline"] = "a=1 quiet a=2"
    configure(tmp_path, args("grub.cmdline.current", {"key": "a", "value": 3}), grub=disk)
    assert disk.env["kubeos_A_cmdline"] == "a=3 quiet"


def test_idempotent_and_check_mode_writes_nothing(tmp_path: Path, disk: FakeBootEnv) -> None:
    configs = args("grub.cmdline.next", {"key": "a", "value": 1}, {"key": "b"}, {"key": "c", "operation": "delete"})
    dry = configure(tmp_path, configs, grub=disk, check=True)
    assert dry.changed and disk.writes == []
    assert dry.diffs()[0]["after"].endswith("kubeos_B_cmdline=a=1 b\n")
    configure(tmp_path, configs, grub=disk)
    assert len(disk.writes) == 1
    assert not configure(tmp_path, configs, grub=disk).changed
    assert len(disk.writes) == 1


def test_current_and_next_in_one_call_make_one_write(tmp_path: Path, disk: FakeBootEnv) -> None:
    configure(
        tmp_path,
        [*args("grub.cmdline.current", {"key": "x", "value": 1}), *args("grub.cmdline.next", {"key": "y", "value": 2})],
        grub=disk,
    )
    assert len(disk.writes) == 1
    assert (disk.env["kubeos_A_cmdline"], disk.env["kubeos_B_cmdline"]) == ("quiet loglevel=3 x=1", "y=2")


def test_arguments_that_overflow_the_1024_byte_block_are_refused(tmp_path: Path, disk: FakeBootEnv) -> None:
    many = [{"key": f"kubeos.arg{i}", "value": "v" * 40} for i in range(30)]
    with pytest.raises(models.SysconfigError, match="do not fit into the GRUB environment block") as caught:
        configure(tmp_path, args("grub.cmdline.next", *many), grub=disk)
    assert "bytes over" in str(caught.value) and "nothing was changed" in str(caught.value)
    assert disk.writes == []
    # What fits does fit: the encoded block stays 1024 bytes.
    configure(tmp_path, args("grub.cmdline.next", *many[:10]), grub=disk)
    assert len(grubenv.encode(disk.env)) == grubenv.GRUBENV_SIZE


def test_a_disk_whose_grub_cfg_does_not_read_the_arguments_is_refused(tmp_path: Path, disk: FakeBootEnv) -> None:
    access = disk.access()
    access.refusal = "laid out by KubeOS"
    from ansible_collections.kubeos.os.plugins.module_utils.sysconfig import plan

    with pytest.raises(models.SysconfigError, match="laid out by KubeOS"):
        plan.build(plan.parse(args("grub.cmdline.next", {"key": "a"})), str(tmp_path), access)
    assert disk.writes == []
