"""Simulated nodes for the cluster tests: each a Node object, a real kubeos-agent on its own loop-backed
disk image, and a real kubeos-proxy process; plus the real kubeos-operator process.

A "reboot" is what the agent's reboot command asks for: the harness stops that node's proxy and agent,
plays GRUB's part on the disk's grubenv (trial slot while tries remain, else the committed one, exactly as
the collection's grub.cfg decides), states the booted slot as the agent's running root, starts the agent
(which verifies and commits a trial slot by itself), reports the slot's PRETTY_NAME as the Node's
``osImage`` the way a kubelet would, and starts the proxy again.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import urllib3
from agent.helpers import DaemonProcess, Node, node_settings, partitions_of
from cluster.apiserver import Cluster, free_port
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from kubeos_operator import names

V1, V2 = "KubeOS 1.0", "KubeOS 2.0"
# The files sysconfigs change, under each node's own root (the agent's configure_root).
NODE_FILES = {
    "etc/sysctl.conf": "vm.swappiness = 60\n",
    "proc/sys/net/ipv4/ip_forward": "0\n",
    "etc/security/limits.conf": "*    soft    nofile    1024\n",
}


def grub_boot(env: dict[str, str]) -> tuple[str, dict[str, str | None]]:
    """The slot GRUB boots with this environment, and what its save_env writes (grubcfg.py's logic)."""
    default = "B" if env.get("kubeos_default") == "B" else "A"
    slot = default
    trial = env.get("kubeos_trial") or ""
    updates: dict[str, str | None] = {}
    if trial:
        tries = env.get("kubeos_tries") or ""
        if trial == default:
            updates.update(kubeos_trial=None, kubeos_tries=None)
        elif tries.isdigit() and int(tries) > 0:
            updates["kubeos_tries"] = str(int(tries) - 1)
            slot = trial
        else:
            updates["kubeos_trial_failed"] = trial
            updates[f"kubeos_{trial}_bootable"] = "no"
        if slot != trial:
            updates.update(kubeos_trial=None, kubeos_tries=None)
    return slot, updates


@dataclass
class SimNode:
    name: str
    disk: Node
    agent: DaemonProcess | None = None
    proxy: subprocess.Popen[bytes] | None = None
    reboots_handled: int = 0
    boots: list[str] = field(default_factory=list)

    @property
    def proxy_log(self) -> Path:
        return self.disk.root / "proxy.log"


class SimCluster:
    """Nodes with agent and proxy, the operator, a reboot loop and a busy-node sampler."""

    def __init__(self, cluster: Cluster, fresh_image: Path, workdir: Path) -> None:
        self.cluster = cluster
        self.fresh_image = fresh_image
        self.workdir = workdir
        self.nodes: dict[str, SimNode] = {}
        self.proxy_kubeconfig = cluster.kubeconfig_for_service_account("kubeos-system", "kubeos-proxy")
        self.operator_kubeconfig = cluster.kubeconfig_for_service_account("kubeos-system", "kubeos-operator")
        self.operator: subprocess.Popen[bytes] | None = None
        self.operator_port = 0
        self.operator_starts = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self.samples: list[tuple[float, int, int]] = []  # (time, busy, cordoned)
        self.start_order: list[str] = []  # nodes in the order they were first seen busy
        self.errors: list[BaseException] = []
        self.proxy_env: dict[str, str] = {}

    # --- nodes --------------------------------------------------------------------------------------------

    def add_node(
        self, name: str, labels: dict[str, str] | None = None, *, start: bool = True, template: Path | None = None
    ) -> SimNode:
        root = self.workdir / name
        root.mkdir(parents=True)
        (root / "certs").mkdir()
        for rel, text in NODE_FILES.items():
            (root / "tree" / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / "tree" / rel).write_text(text)
        image = root / "disk.img"
        subprocess.run(["cp", "--sparse=always", str(template or self.fresh_image), str(image)], check=True)
        partitions = partitions_of(image)
        disk = Node(root=root, image=image, partitions=partitions)
        disk.configure(**node_settings(root, image, partitions), configure_root=str(root / "tree"))
        sim = SimNode(name, disk)
        self.nodes[name] = sim
        self.cluster.create_node(name, labels, os_image=V1)
        if start:
            self.start_agent(sim)
            self.start_proxy(sim)
        return sim

    def start_agent(self, sim: SimNode) -> None:
        # sysconfigs go to the node's own tree (its agent's configure_root, set in add_node), never to this
        # machine's /etc or /proc.
        agent = DaemonProcess(sim.disk)
        agent.start()
        sim.agent = agent

    def start_proxy(self, sim: SimNode) -> None:
        env = {
            **os.environ,
            "KUBEOS_PROXY_POLL": "1",
            "KUBEOS_PROXY_BACKOFF": "1",
            **self.proxy_env,
        }
        env.pop("POD_NAME", None)
        env.pop("POD_NAMESPACE", None)
        with open(sim.proxy_log, "ab") as log:
            sim.proxy = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "kubeos_operator.proxy",
                    "--node",
                    sim.name,
                    "--kubeconfig",
                    str(self.proxy_kubeconfig),
                    "--agent-socket",
                    str(sim.disk.socket),
                ],
                stdout=log,
                stderr=log,
                env=env,
            )

    @staticmethod
    def _stop_process(proc: subprocess.Popen[bytes] | None, timeout: float = 30) -> None:
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def stop_node(self, sim: SimNode) -> None:
        self._stop_process(sim.proxy)
        sim.proxy = None
        if sim.agent is not None:
            sim.agent.stop()
            sim.agent = None

    def reboot(self, sim: SimNode) -> str:
        """Stop proxy and agent, boot the slot GRUB would, start them again; returns the booted slot."""
        self.stop_node(sim)
        slot, updates = grub_boot(sim.disk.grubenv())
        if updates:
            sim.disk.set_grubenv(**updates)
        sim.disk.running(slot)
        sim.boots.append(slot)
        self.start_agent(sim)
        status = sim.disk.client().status().body
        pretty = status["disk"]["slots"][slot]["pretty_name"]
        deadline = time.monotonic() + 120
        while True:  # the kubelet reports its node until the API server takes it
            try:
                self.cluster.set_node_os_image(sim.name, pretty)
                break
            except (ApiException, urllib3.exceptions.HTTPError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        self.start_proxy(sim)
        return slot

    # --- the operator ---------------------------------------------------------------------------------------

    def start_operator(self, *extra: str) -> None:
        self.operator_port = self.operator_port or free_port()
        log = open(self.workdir / "operator.log", "ab")  # noqa: SIM115 - the process owns it
        self.operator_starts += 1
        self.operator = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kubeos_operator.operator",
                "--kubeconfig",
                str(self.operator_kubeconfig),
                "--metrics-address",
                f"127.0.0.1:{self.operator_port}",
                "--lease-namespace",
                "kubeos-system",
                "--identity",
                f"{self.workdir.name}-operator-{self.operator_starts}",
                *extra,
            ],
            stdout=log,
            stderr=log,
        )
        log.close()

    def kill_operator(self) -> None:
        if self.operator is not None and self.operator.poll() is None:
            self.operator.kill()
            self.operator.wait(timeout=10)

    def stop_operator(self) -> None:
        self._stop_process(self.operator)

    def wait_operator_ready(self, timeout: float = 60) -> None:
        def ready() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.operator_port}/readyz", timeout=2) as resp:
                    return bool(resp.status == 200)
            except OSError:
                return False

        wait_for(ready, timeout, "the operator to be ready", self)

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.operator_port}/metrics", timeout=5) as resp:
            return str(resp.read().decode())

    # --- background loops -----------------------------------------------------------------------------------

    def _loop(self, name: str, body: Callable[[], None], interval: float) -> None:
        def run() -> None:
            while not self._stop.is_set():
                try:
                    body()
                except (ApiException, urllib3.exceptions.HTTPError):
                    pass  # the API server is away (a test restarts it): next time
                except Exception as exc:  # surfaced by wait_for
                    self.errors.append(exc)
                    return
                self._stop.wait(interval)

        thread = threading.Thread(target=run, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _reboots(self) -> None:
        for sim in list(self.nodes.values()):
            done = len(sim.disk.reboots())
            if done > sim.reboots_handled:
                sim.reboots_handled = done
                self.reboot(sim)

    def _sample(self) -> None:
        nodes = json.loads(k8s.CoreV1Api(self.cluster.api).list_node(_preload_content=False).data)["items"]
        mine = [n for n in nodes if n["metadata"]["name"] in self.nodes]
        busy = sum(
            1
            for n in mine
            if names.LABEL_UPGRADING in (n["metadata"].get("labels") or {})
            or names.LABEL_CONFIGURING in (n["metadata"].get("labels") or {})
        )
        cordoned = sum(1 for n in mine if (n.get("spec") or {}).get("unschedulable"))
        started = [
            n["metadata"]["name"]
            for n in mine
            if names.LABEL_UPGRADING in (n["metadata"].get("labels") or {})
            or names.LABEL_CONFIGURING in (n["metadata"].get("labels") or {})
        ]
        with self._lock:
            self.samples.append((time.monotonic(), busy, cordoned))
            for name in sorted(started):
                if name not in self.start_order:
                    self.start_order.append(name)

    def start_loops(self) -> None:
        self._loop("reboots", self._reboots, 0.2)
        self._loop("sampler", self._sample, 0.1)

    @property
    def max_busy(self) -> int:
        with self._lock:
            return max((b for _, b, _ in self.samples), default=0)

    @property
    def max_cordoned(self) -> int:
        with self._lock:
            return max((c for _, _, c in self.samples), default=0)

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)
        self.stop_operator()
        for sim in self.nodes.values():
            with contextlib.suppress(Exception):
                self.stop_node(sim)

    def logs(self) -> str:
        parts = []
        op_log = self.workdir / "operator.log"
        if op_log.exists():
            parts.append("--- operator ---\n" + "\n".join(op_log.read_text(errors="replace").splitlines()[-60:]))
        for sim in self.nodes.values():
            if sim.proxy_log.exists():
                tail = "\n".join(sim.proxy_log.read_text(errors="replace").splitlines()[-25:])
                parts.append(f"--- proxy {sim.name} ---\n{tail}")
        return "\n".join(parts)


@pytest.fixture(name="sim")
def sim_fixture(deployed: Cluster, cluster: Cluster, images: Any, tmp_path: Path) -> Iterator[SimCluster]:
    """Simulated nodes (agents on loop-backed disks from the ``fresh`` template) and the operator, for a test
    that does ``from simnodes import sim_fixture``; closed, with every process stopped, after the test."""
    if os.geteuid() != 0:
        pytest.skip("needs root (loop devices)")
    with sim_cluster(cluster, images.fresh, tmp_path) as s:
        yield s


@contextlib.contextmanager
def sim_cluster(cluster: Cluster, fresh_image: Path, workdir: Path) -> Iterator[SimCluster]:
    sim = SimCluster(cluster, fresh_image, workdir)
    try:
        yield sim
    finally:
        sim.close()


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, sim: SimCluster | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if sim is not None and sim.operator is not None and sim.operator.poll() is not None:
            raise AssertionError(f"the operator exited with {sim.operator.returncode}\n{sim.logs()}")
        if sim is not None and sim.errors:
            raise AssertionError(f"harness error while waiting for {what}: {sim.errors[0]!r}\n{sim.logs()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}\n{sim.logs() if sim else ''}")
        time.sleep(0.25)
