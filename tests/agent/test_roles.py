"""The roles behind the agent's playbooks, used directly (as over SSH): kubeos.os.upgrade with stage ``all``,
then kubeos.os.mark_good and kubeos.os.rollback on a disk image that is not running."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import run_playbook

from .conftest import Images
from .helpers import Node

pytestmark = pytest.mark.loop


def play(role: str, **variables: Any) -> list[dict[str, Any]]:
    return [{"hosts": "localhost", "gather_facts": False, "roles": [{"role": role, **variables}]}]


def test_upgrade_role_writes_and_arms_then_mark_good_and_rollback(
    make_node: Callable[..., Node], images: Images, tmp_path: Path
) -> None:
    node = make_node("fresh")
    device = str(node.image)
    status, events, out = run_playbook(
        tmp_path / "upgrade",
        play(
            "kubeos.os.upgrade",
            kubeos_upgrade_device=device,
            kubeos_upgrade_image_src=f"file://{images.v2}",
            kubeos_upgrade_image_sha256=images.v2_sha256,
            kubeos_upgrade_tries=2,
        ),
    )
    assert status == "successful", out
    env = node.grubenv()
    assert (env["kubeos_trial"], env["kubeos_tries"], env["kubeos_B_bootable"]) == ("B", "2", "yes")
    assert [
        e["res"]["slot"] for e in events if e["task_action"] in ("kubeos.os.slot_write", "kubeos.os.boot_slot")
    ] == [
        "B",
        "B",
    ]

    # A disk that is not running: committing takes the trial slot.
    status, _events, out = run_playbook(tmp_path / "good", play("kubeos.os.mark_good", kubeos_mark_good_device=device))
    assert status == "successful", out
    env = node.grubenv()
    assert env["kubeos_default"] == "B" and "kubeos_trial" not in env

    status, _events, out = run_playbook(tmp_path / "back", play("kubeos.os.rollback", kubeos_rollback_device=device))
    assert status == "successful", out
    assert node.grubenv()["kubeos_default"] == "A"


def test_upgrade_role_refuses_an_unknown_stage(make_node: Callable[..., Node], tmp_path: Path) -> None:
    node = make_node("fresh")
    status, _events, out = run_playbook(
        tmp_path / "bad",
        play("kubeos.os.upgrade", kubeos_upgrade_device=str(node.image), kubeos_upgrade_stage="everything"),
    )
    assert status == "failed"
    assert "kubeos_upgrade_stage" in out
