"""The daemon process itself: start-up, socket ownership, configuration errors, logs, a clean stop."""

from __future__ import annotations

import json
import shutil
import socket
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from .conftest import Images
from .helpers import (
    DaemonProcess,
    Node,
    agent_in_process,
    loop_devices_over,
    marked_processes,
    slow_server,
    start_op,
    wait_until,
)

pytestmark = pytest.mark.loop
MIB = 1024 * 1024
REPO = Path(__file__).resolve().parents[2]
KUBEOS_AGENT = Path(sys.executable).parent / "kubeos-agent"


def test_daemon_replaces_a_stale_socket_and_removes_it_on_sigterm(make_node: Callable[..., Node]) -> None:
    node = make_node("fresh")
    node.socket.parent.mkdir(parents=True, exist_ok=True)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(node.socket))  # bound, never listening, then closed: what a killed agent leaves
    stale.close()
    daemon = DaemonProcess(node).start()
    mode = node.socket.stat().st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    assert daemon.stop() == 0
    assert not node.socket.exists()
    records = daemon.logs()
    assert records and all({"ts", "level", "logger", "msg"} <= set(r) for r in records)
    assert any(r["msg"] == "kubeos agent listening" and r["socket"] == str(node.socket) for r in records)


def test_a_second_agent_on_the_same_socket_refuses_to_start(make_node: Callable[..., Node]) -> None:
    node = make_node("fresh")
    with agent_in_process(node):
        proc = subprocess.run(
            [sys.executable, "-m", "kubeos_agent.daemon", "--config", str(node.config_file)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert node.client().status().status == 200  # the first one still serves
    assert proc.returncode == 1
    assert "another kubeos agent is listening" in proc.stderr


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("socket_path: [1]\n", "socket_path"),
        ("reboot_comand: [reboot]\n", "reboot_comand: Extra inputs are not permitted"),
        ("trial_tries: 12\n", "trial_tries"),
        ("health: {units: [{}]}\n", "health.units.0.name"),
        ("- a list\n", "must be a mapping"),
        ("collections_path: /nonexistent\n", "holds no ansible_collections/kubeos/os"),
    ],
)
def test_a_bad_configuration_stops_the_daemon_with_exit_2(tmp_path: Path, content: str, message: str) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text(content)
    proc = subprocess.run(
        [sys.executable, "-m", "kubeos_agent.daemon", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert message in proc.stderr, proc.stderr


def test_logfmt_logs(make_node: Callable[..., Node]) -> None:
    node = make_node("fresh")
    node.configure(log_format="logfmt")
    daemon = DaemonProcess(node).start()
    assert daemon.stop() == 0
    lines = daemon.log.read_text().splitlines()
    assert any(line.startswith("ts=") and 'msg="kubeos agent listening"' in line for line in lines), lines
    with pytest.raises(json.JSONDecodeError):
        json.loads(lines[0])


def test_sigterm_during_a_write_cancels_it_cleanly(make_node: Callable[..., Node], images: Images) -> None:
    node = make_node("fresh")
    daemon = DaemonProcess(node).start()
    with slow_server(images.www, 2 * MIB) as url:
        op = start_op(
            node, "prepare_upgrade", imageurl=f"{url}/{images.v2.name}", checksum=images.v2_sha256, flagSafe=True
        )
        client = node.client()
        wait_until(lambda: client.get(op["id"]).operation["phase"] == "writing", what="writing")
        assert daemon.stop() == 0
    record = json.loads((node.journal_dir / f"{op['id']}.json").read_text())
    assert record["state"] == "canceled"
    assert any(e["message"] == "the agent is stopping" for e in record["events"])
    assert marked_processes(op["id"]) == []
    assert loop_devices_over(node.image) == []
    assert node.grubenv()["kubeos_B_bootable"] == "no"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_the_systemd_unit_verifies(tmp_path: Path) -> None:
    unit = (REPO / "deploy" / "systemd" / "kubeos-agent.service").read_text()
    assert "ExecStart=/opt/kubeos/venv/bin/kubeos-agent " in unit
    # Point ExecStart at an executable that exists here; everything else is verified as shipped.
    copy = tmp_path / "kubeos-agent.service"
    copy.write_text(unit.replace("/opt/kubeos/venv/bin/kubeos-agent", str(KUBEOS_AGENT)))
    proc = subprocess.run(
        ["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "", proc.stderr
