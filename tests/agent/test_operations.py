"""Every operation of the agent, for real: in-process agent on a socket, real ansible-runner, real modules,
loop-backed disk images, and a stated running root."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from typing import Any

import pytest
from support.tls import make_pki, serve

from .conftest import Images
from .helpers import (
    Node,
    agent_in_process,
    loop_devices_over,
    marked_processes,
    run_op,
    slow_server,
    start_op,
    wait_op,
    wait_until,
)

pytestmark = pytest.mark.loop
MIB = 1024 * 1024


def prepare_fields(images: Images, url: str | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "imageurl": url or f"file://{images.v2}",
        "checksum": images.v2_sha256,
        "version": "KubeOS 2.0",
        **extra,
    }


def test_prepare_upgrade_writes_the_inactive_slot_and_journals_it(
    make_node: Callable[..., Node], images: Images
) -> None:
    node = make_node("fresh")
    active = node.slot_sha256("A")
    with agent_in_process(node):
        op = run_op(node, "prepare_upgrade", **prepare_fields(images))
        status = node.client().status().body

    assert op["state"] == "succeeded", op
    assert op["result"]["slot"] == "B"
    assert op["result"]["version"] == "2.0" and op["result"]["version_matches"] is True
    assert op["result"]["sha256"] == images.v2_sha256
    size = images.v2.stat().st_size
    assert op["progress"] == {"phase": "done", "bytes_done": size, "bytes_total": size, "percent": 100.0}
    assert any(e["task"] == "Stream the verified image into the inactive slot" for e in op["events"])
    assert node.slot_sha256("A") == active
    assert status["disk"]["slots"]["B"]["bootable"] is True
    assert status["disk"]["slots"]["B"]["version"] == "2.0"
    assert status["disk"]["grub"] == {"default": "A", "trial": None, "tries": None, "trial_failed": None}
    assert status["current_operation"] is None
    assert status["last_operation"]["id"] == op["id"]
    record = json.loads((node.journal_dir / f"{op['id']}.json").read_text())
    assert record["state"] == "succeeded" and record["kind"] == "prepare_upgrade"
    assert record["request"]["checksum"] == images.v2_sha256
    assert (node.root / "persist/runner/artifacts" / op["id"] / "stdout").exists()
    assert node.reboots() == []


def test_prepare_upgrade_over_https_with_mutual_tls(make_node: Callable[..., Node], images: Images) -> None:
    node = make_node("fresh")
    pki = make_pki(node.root / "certs")
    with serve(images.www, pki=pki, require_client_cert=True) as server, agent_in_process(node):
        url = f"{server.url}/{images.v2.name}"
        op = run_op(
            node,
            "prepare_upgrade",
            **prepare_fields(images, url, mtls=True, cacert="ca.crt", clientcert="client.crt", clientkey="client.key"),
        )
        assert op["state"] == "succeeded", op
        assert server.requests == [f"/{images.v2.name}"]
        assert op["request"]["imageurl"] == url
    assert node.grubenv()["kubeos_B_bootable"] == "yes"


def test_https_with_a_client_certificate_the_server_does_not_trust_writes_nothing(
    make_node: Callable[..., Node], images: Images
) -> None:
    node = make_node("fresh")
    pki = make_pki(node.root / "certs")
    before = node.grubenv()
    with serve(images.www, pki=pki, require_client_cert=True) as server, agent_in_process(node):
        fields = prepare_fields(
            images, f"{server.url}/{images.v2.name}", mtls=True, cacert="ca.crt",
            clientcert="bad-client.crt", clientkey="bad-client.key",
        )  # fmt: skip
        op = run_op(node, "prepare_upgrade", **fields)
    assert op["state"] == "failed"
    assert "client certificate" in op["error"] or "TLS" in op["error"], op["error"]
    # The source is opened before the slot is touched: not even the GRUB environment changed.
    assert node.grubenv() == before


def test_wrong_checksum_commits_nothing_and_leaves_the_active_slot_untouched(
    make_node: Callable[..., Node], images: Images
) -> None:
    node = make_node("fresh")
    active = node.slot_sha256("A")
    with agent_in_process(node):
        op = run_op(node, "prepare_upgrade", **prepare_fields(images, checksum="0" * 64))
        arm = run_op(node, "upgrade", reboot=True)
        status = node.client().status().body

    assert op["state"] == "failed"
    assert "sha256 of the image is" in op["error"] and images.v2_sha256 in op["error"]
    env = node.grubenv()
    assert env["kubeos_B_bootable"] == "no" and "kubeos_B_image" not in env
    assert env["kubeos_default"] == "A" and "kubeos_trial" not in env
    assert node.slot_sha256("A") == active
    assert status["disk"]["slots"]["B"]["bootable"] is False
    # Nothing to arm: the upgrade is refused by boot_slot and nothing reboots.
    assert arm["state"] == "failed" and "not bootable" in arm["error"]
    assert node.reboots() == []


def test_a_second_operation_while_one_runs_gets_409_naming_the_running_one(
    make_node: Callable[..., Node], images: Images
) -> None:
    node = make_node("fresh")
    with agent_in_process(node), slow_server(images.www, 4 * MIB) as url:
        op = start_op(node, "prepare_upgrade", **prepare_fields(images, f"{url}/{images.v2.name}", flagSafe=True))
        for operation, fields in (("mark_good", {}), ("rollback", {"reboot": False}), ("upgrade", {})):
            resp = node.client().start(operation, **fields)
            assert resp.status == 409, resp.body
            assert resp.error["code"] == "busy"
            assert resp.error["running"]["id"] == op["id"]
            assert resp.error["running"]["kind"] == "prepare_upgrade"
            assert op["id"] in resp.error["message"]
        assert node.client().cancel(op["id"]).status == 202
        final = wait_op(node, op["id"])
        assert final["state"] == "canceled"
        # Idle again: the next operation is accepted.
        assert run_op(node, "mark_good")["state"] == "succeeded"


def test_cancel_during_a_slow_download_leaves_the_slot_not_bootable(
    make_node: Callable[..., Node], images: Images
) -> None:
    node = make_node("prepared")  # slot B holds a bootable 2.0 that the new write replaces
    active = node.slot_sha256("A")
    payload = node.root / "www"
    payload.mkdir()
    other = payload / "os-2.1.ext4"
    shutil.copy(images.v2, other)
    with other.open("r+b") as handle:  # a different image: another checksum, so it is really written
        handle.seek(other.stat().st_size - 4096)
        handle.write(b"\x01" * 4096)
    from support.osimage import file_sha256

    with agent_in_process(node), slow_server(payload, 2 * MIB) as url:
        op = start_op(
            node, "prepare_upgrade", imageurl=f"{url}/{other.name}", checksum=file_sha256(other), flagSafe=True
        )
        client = node.client()

        def progress() -> dict[str, object] | None:
            doc = client.get(op["id"]).operation
            done = doc["progress"]["bytes_done"]
            return doc if done and done > 2 * MIB else None

        first = wait_until(progress, what="bytes written")
        assert first["state"] == "running" and first["phase"] == "writing"
        assert first["progress"]["bytes_total"] == other.stat().st_size
        assert first["progress"]["bytes_done"] < first["progress"]["bytes_total"]
        assert node.client().status().body["disk_stale"] is True  # the disk is not read while it is written
        started = time.monotonic()
        resp = client.cancel(op["id"])
        assert resp.status == 202 and resp.operation["cancel_requested"] is True
        final = wait_op(node, op["id"])
        took = time.monotonic() - started
        assert client.cancel(op["id"]).status == 409  # finished: nothing to cancel

    assert final["state"] == "canceled"
    assert "left not bootable" in final["error"]
    assert took < 10
    assert marked_processes(op["id"]) == []
    assert loop_devices_over(node.image) == []
    env = node.grubenv()
    assert env["kubeos_B_bootable"] == "no" and "kubeos_B_image" not in env
    assert env["kubeos_default"] == "A"
    assert node.slot_sha256("A") == active


def test_upgrade_arms_a_trial_of_the_prepared_slot_then_reboots(make_node: Callable[..., Node]) -> None:
    node = make_node("prepared")
    with agent_in_process(node):
        op = run_op(node, "upgrade", tries=5, version="KubeOS 2.0")
        status = node.client().status().body
    assert op["state"] == "succeeded", op
    assert op["result"]["trial_slot"] == "B" and op["result"]["from_slot"] == "A"
    assert op["result"]["tries"] == 5 and op["result"]["version"] == "2.0"
    assert op["outcome"] == "pending-reboot"
    env = node.grubenv()
    assert (env["kubeos_trial"], env["kubeos_tries"], env["kubeos_default"]) == ("B", "5", "A")
    assert node.reboots() == ["reboot "]
    assert any(e["kind"] == "reboot" for e in op["events"])
    assert status["last_upgrade"]["outcome"] == "pending-reboot"
    assert status["disk"]["grub"]["trial"] == "B"


def test_upgrade_refuses_a_slot_holding_another_version(make_node: Callable[..., Node]) -> None:
    node = make_node("prepared")
    before = node.grubenv()
    with agent_in_process(node):
        op = run_op(node, "upgrade", version="KubeOS 3.0")
    assert op["state"] == "failed" and "KubeOS 3.0" in op["error"]
    assert node.grubenv() == before and node.reboots() == []


def test_rollback_refuses_a_slot_that_is_not_bootable(make_node: Callable[..., Node]) -> None:
    node = make_node("fresh")
    before = node.grubenv()
    with agent_in_process(node):
        op = run_op(node, "rollback")
    assert op["state"] == "failed"
    assert "slot B is marked not bootable" in op["error"]
    assert node.grubenv() == before and node.reboots() == []


def test_rollback_switches_to_the_bootable_other_slot_and_reboots(make_node: Callable[..., Node]) -> None:
    node = make_node("prepared")
    with agent_in_process(node):
        op = run_op(node, "rollback")
    assert op["state"] == "succeeded", op
    assert op["result"]["slot"] == "B" and op["result"]["from_slot"] == "A"
    assert node.grubenv()["kubeos_default"] == "B"
    assert node.reboots() == ["reboot "]
    # After the reboot the node runs slot B: the rollback is recorded as done.
    node.running("B")
    with agent_in_process(node):
        again = node.client().get(op["id"]).operation
    assert again["outcome"] == "switched"


def test_mark_good_commits_the_running_slot_and_ends_an_armed_trial(make_node: Callable[..., Node]) -> None:
    node = make_node("prepared")
    with agent_in_process(node):
        unchanged = run_op(node, "mark_good")
        assert run_op(node, "upgrade", reboot=False)["state"] == "succeeded"
        assert node.grubenv()["kubeos_trial"] == "B"
        ended = run_op(node, "mark_good")
    assert unchanged["state"] == "succeeded" and unchanged["result"] == {
        "slot": "A",
        "changed": False,
        "message": "slot A is committed",
    }
    assert ended["state"] == "succeeded" and ended["result"]["changed"] is True
    env = node.grubenv()
    assert env["kubeos_default"] == "A" and "kubeos_trial" not in env
    assert node.reboots() == []
