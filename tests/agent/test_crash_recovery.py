"""``kill -9`` of the real daemon in the middle of a slot write, then a restart."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from .conftest import Images
from .helpers import (
    DaemonProcess,
    Node,
    loop_devices_over,
    marked_processes,
    run_op,
    slow_server,
    start_op,
    wait_until,
)

pytestmark = pytest.mark.loop
MIB = 1024 * 1024


def test_kill_9_during_a_write_is_recovered_on_restart_and_a_retry_succeeds(
    make_node: Callable[..., Node], images: Images
) -> None:
    node = make_node("fresh")
    active = node.slot_sha256("A")
    daemon = DaemonProcess(node).start()
    restarted: DaemonProcess | None = None
    try:
        with slow_server(images.www, 2 * MIB) as url:
            op = start_op(
                node,
                "prepare_upgrade",
                imageurl=f"{url}/{images.v2.name}",
                checksum=images.v2_sha256,
                flagSafe=True,
            )
            client = node.client()
            wait_until(lambda: (client.get(op["id"]).operation["progress"]["bytes_done"] or 0) > MIB, what="writing")
            daemon.kill9()
            # The module does not die with the agent: it is in its own session, still writing.
            assert marked_processes(op["id"]), "expected the orphaned module to still run"
            time.sleep(0.3)

            restarted = DaemonProcess(node).start()
            record = node.client().get(op["id"]).operation

        assert record["state"] == "interrupted"
        assert "stopped while the operation was writing" in record["error"]
        assert "left not bootable" in record["error"]
        assert marked_processes(op["id"]) == []  # the leftovers were stopped on start-up
        assert loop_devices_over(node.image) == []  # and they cleaned up after themselves
        env = node.grubenv()
        assert env["kubeos_B_bootable"] == "no" and env["kubeos_default"] == "A" and "kubeos_trial" not in env
        assert node.slot_sha256("A") == active
        status = node.client().status().body
        assert status["current_operation"] is None
        assert status["disk"]["slots"]["B"]["bootable"] is False
        assert any(r.get("msg") == "operation interrupted" for r in restarted.logs())

        retry = run_op(node, "prepare_upgrade", imageurl=f"file://{images.v2}", checksum=images.v2_sha256)
        assert retry["state"] == "succeeded", retry
        assert node.grubenv()["kubeos_B_bootable"] == "yes"
        assert node.slot_sha256("A") == active
    finally:
        if restarted is not None:
            restarted.stop()
        daemon.stop()
