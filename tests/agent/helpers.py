"""Helpers of the agent tests: a node (disk image + agent configuration), the agent in-process or as a real
daemon process, a deliberately slow image server, and readers for what the disk holds."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kubeos_agent.client import AgentClient, AgentUnreachable
from kubeos_agent.config import AgentConfig

REPO = Path(__file__).resolve().parents[2]
COLLECTIONS = REPO / "collections"
MIB = 1024 * 1024


# --- the node --------------------------------------------------------------------------------------------


@dataclass
class Node:
    """A disk image laid out and provisioned by the real modules, and the agent configuration for it."""

    root: Path
    image: Path
    partitions: dict[str, dict[str, Any]]  # by partition name (ESP, BOOT, ROOT-A, ...): start/size in bytes, uuid
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def socket(self) -> Path:
        return Path(self.settings["socket_path"])

    @property
    def journal_dir(self) -> Path:
        return Path(self.settings["journal_dir"])

    @property
    def reboot_log(self) -> Path:
        return self.root / "reboots.log"

    @property
    def config_file(self) -> Path:
        return self.root / "agent.yaml"

    def partuuid(self, slot: str) -> str:
        return str(self.partitions[f"ROOT-{slot}"]["uuid"])

    def running(self, slot: str) -> None:
        """State which slot runs (what the kernel command line says on a real node)."""
        self.configure(running_root=f"PARTUUID={self.partuuid(slot)}")

    def configure(self, **settings: Any) -> None:
        self.settings.update(settings)
        self.config_file.write_text(yaml.safe_dump(self.settings, sort_keys=False))

    @property
    def config(self) -> AgentConfig:
        return AgentConfig.model_validate(self.settings)

    def client(self, timeout: float = 30.0) -> AgentClient:
        return AgentClient(self.socket, timeout=timeout)

    def reboots(self) -> list[str]:
        if not self.reboot_log.exists():
            return []
        return [line for line in self.reboot_log.read_text().splitlines() if line]

    def slot_sha256(self, slot: str) -> str:
        """sha256 of the slot's partition, read from the image file (no loop device)."""
        part = self.partitions[f"ROOT-{slot}"]
        digest = hashlib.sha256()
        with open(self.image, "rb") as handle:
            handle.seek(part["start"])
            left = part["size"]
            while left:
                chunk = handle.read(min(4 * MIB, left))
                if not chunk:
                    break
                digest.update(chunk)
                left -= len(chunk)
        return digest.hexdigest()

    def grubenv(self) -> dict[str, str]:
        """The GRUB environment of the image, read with the collection's own reader (read-only loop)."""
        from ansible_collections.kubeos.os.plugins.module_utils import blockdev, slots

        with blockdev.attached(str(self.image), writable=False) as disk:
            layout = slots.recognise(blockdev.read_table(disk))
            return slots.BootEnv(layout).read()

    def set_grubenv(self, **values: str | None) -> None:
        from ansible_collections.kubeos.os.plugins.module_utils import blockdev, slots

        with blockdev.attached(str(self.image)) as disk:
            layout = slots.recognise(blockdev.read_table(disk))
            slots.BootEnv(layout).update(values)


def partitions_of(image: Path) -> dict[str, dict[str, Any]]:
    out = subprocess.run(["sfdisk", "--json", str(image)], capture_output=True, text=True, check=True).stdout
    table = json.loads(out)["partitiontable"]
    sector = int(table.get("sectorsize", 512))
    return {
        p["name"]: {"start": p["start"] * sector, "size": p["size"] * sector, "uuid": p["uuid"].lower()}
        for p in table["partitions"]
    }


def reboot_script(path: Path, log: Path) -> Path:
    """A stand-in for ``systemctl reboot`` that records each call."""
    path.write_text(f'#!/bin/sh\necho "reboot $*" >> {log}\n')
    path.chmod(0o755)
    return path


def node_settings(root: Path, image: Path, partitions: dict[str, dict[str, Any]]) -> dict[str, Any]:
    script = reboot_script(root / "reboot.sh", root / "reboots.log")
    return {
        "socket_path": str(root / "run" / "agent.sock"),
        "journal_dir": str(root / "persist" / "journal"),
        "artifacts_dir": str(root / "persist" / "runner"),
        "runtime_dir": str(root / "run"),
        "cert_dir": str(root / "certs"),
        "collections_path": str(COLLECTIONS),
        "ansible_playbook": str(Path(sys.executable).parent / "ansible-playbook"),
        "python_interpreter": sys.executable,
        "device": str(image),
        "running_root": f"PARTUUID={partitions['ROOT-A']['uuid']}",
        "reboot_command": [str(script)],
        "download_timeout": 20,
        "cancel_grace": 10,
        "health": {"deadline": 5, "interval": 0.5},
        "log_level": "info",
    }


# --- the agent ---------------------------------------------------------------------------------------------


def wait_for_socket(client: AgentClient, timeout: float = 20.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.request("GET", "/v1/operations")
            return
        except AgentUnreachable:
            if proc is not None and proc.poll() is not None:
                raise AssertionError(f"the agent exited with {proc.returncode} before listening") from None
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@contextlib.contextmanager
def agent_in_process(node: Node) -> Iterator[Any]:
    """The agent (service.Agent) serving from a thread of the test process."""
    from kubeos_agent.service import Agent

    agent = Agent(node.config)
    agent.start()
    thread = threading.Thread(target=agent.serve_forever, name="agent", daemon=True)
    thread.start()
    try:
        yield agent
    finally:
        agent.stop()
        thread.join(timeout=30)


class DaemonProcess:
    """``kubeos-agent --config FILE`` as a real process (for kill -9 and restarts)."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = node.root / "agent.log"

    def start(self) -> DaemonProcess:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "kubeos_agent.daemon", "--config", str(self.node.config_file)],
                stdout=log,
                stderr=log,
                cwd=self.node.root,
            )
        wait_for_socket(self.node.client(), proc=self.proc)
        return self

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout=10)

    def logs(self) -> list[dict[str, Any]]:
        records = []
        for line in self.log.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                records.append(json.loads(line))
        return records


def wait_op(node: Node, op_id: str, timeout: float = 120.0) -> dict[str, Any]:
    return node.client().wait(op_id, timeout=timeout, interval=0.1)


def start_op(node: Node, operation: str, **fields: Any) -> dict[str, Any]:
    resp = node.client().start(operation, **fields)
    assert resp.status == 202, resp.body
    return resp.operation


def run_op(node: Node, operation: str, timeout: float = 120.0, **fields: Any) -> dict[str, Any]:
    return wait_op(node, start_op(node, operation, **fields)["id"], timeout)


def wait_until(predicate: Any, timeout: float = 30.0, interval: float = 0.05, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


# --- a slow image server ----------------------------------------------------------------------------------


class _SlowHandler(http.server.BaseHTTPRequestHandler):
    server: SlowServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        name = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).lstrip("/")
        path = self.server.root / name
        if "/" in name or not path.is_file():
            self.send_error(404)
            return
        size = path.stat().st_size
        self.send_response(200)
        self.send_header("Content-Length", str(size))
        self.end_headers()
        step = max(1, int(self.server.rate * 0.05))
        with open(path, "rb") as handle:
            while not self.server.stopping.is_set():
                chunk = handle.read(step)
                if not chunk:
                    break
                try:
                    self.wfile.write(chunk)
                except OSError:
                    return  # the client went away (cancelled)
                time.sleep(0.05)


class SlowServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path, rate: float) -> None:
        self.root = root
        self.rate = rate  # bytes per second
        self.stopping = threading.Event()
        super().__init__(("127.0.0.1", 0), _SlowHandler)

    def handle_error(self, request: object, client_address: object) -> None:
        pass


@contextlib.contextmanager
def slow_server(root: Path, rate: float) -> Iterator[str]:
    """Serve the files in ``root`` over plain HTTP at ``rate`` bytes per second; yield the base URL."""
    server = SlowServer(root, rate)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.stopping.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


# --- processes ----------------------------------------------------------------------------------------------


def marked_processes(op_id: str) -> list[int]:
    from kubeos_agent import processes

    return [p.pid for p in processes.find(op_id)]


def loop_devices_over(image: Path) -> list[str]:
    res = subprocess.run(
        ["losetup", "--associated", str(image), "--noheadings", "--output", "NAME"],
        capture_output=True,
        text=True,
        check=False,
    )
    return [line.strip() for line in res.stdout.splitlines() if line.strip()]


def env_without_marker() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("KUBEOS_AGENT_OPERATION", None)
    return env
