#!/usr/bin/env python3
"""Benchmark the os-operator at scale: 1000 Nodes on the real test API server, ``maxunavailable: 50``.

Run as root from the repository root (kube-apiserver is built and cached on first use, like the tests)::

    .venv/bin/python bench/operator_scale.py [--nodes 1000] [--max-unavailable 50] [--work 20]
                                             [--timeinterval 1] [--idle 30] [--keep]

Set-up (untimed): etcd and kube-apiserver on 127.0.0.1 (tests/cluster/apiserver.py) with an audit policy
that logs every request of the operator's ServiceAccount (metadata only); deploy/'s CRDs, namespace and
RBAC applied server-side; ``--nodes`` Nodes registered as a kubelet would (Ready, osImage ``KubeOS 1.0``);
the real operator (``python -m kubeos_operator.operator``, leader election on) with the ServiceAccount's
token.

The node side is simulated by the benchmark, one thread for all nodes: it watches the OSInstances and,
``--work`` seconds after a node was given an upgrade, does what the os-proxy and the kubelet do when a node
is through: reports the new osImage on the Node, writes the OSInstance's status ``done``, sets its
``nodestatus`` back to ``idle`` and takes the operation label off the Node (writes from a pool of threads, so
that fifty nodes finishing together are not served one after the other).

Timed: from creating the OS object (``osversion: KubeOS 2.0``, parallel) until every Node runs 2.0 and is
free again. Measured:

- **makespan** against the ideal ``ceil(N/k) x t_node``, where ``t_node`` is the mean per-node time the
  simulator measured in this run (assignment seen → its last write acknowledged: ``--work`` plus its own
  write latency), so the ratio holds only the operator's delays (noticing free room, rounds, its writes);
- the most nodes ever busy at once (never more than ``k``), sampled by the simulator at every change;
- **API requests** of the operator per node transition, by verb and resource, from the API server's audit
  log (writes: create, update, patch, delete), over the rollout;
- **operator CPU** (user + system seconds of its process, from /proc) over the rollout, per transition, and
  while idle for ``--idle`` seconds after the rollout is complete (as a percentage of one core);
- **memory**: the operator's peak RSS (VmHWM).

The last line is ``makespan_ratio <measured / ideal>``.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import heapq
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "operator"))

V1, V2 = "KubeOS 1.0", "KubeOS 2.0"
NAMESPACE = "bench"
OPERATOR_SA = ("kubeos-system", "kubeos-operator")
WRITE_VERBS = ("create", "update", "patch", "delete", "deletecollection")
AUDIT_POLICY = """\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived", "ResponseStarted"]
rules:
- level: Metadata
  users: ["system:serviceaccount:{ns}:{name}"]
- level: None
"""


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- the operator process ---------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime, stime (fields 14 and 15 of stat)


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# --- the node side ----------------------------------------------------------------------------------------------


class NodeSide:
    """Plays every node's proxy and kubelet: ``work`` seconds after an assignment the node is through."""

    def __init__(self, cluster: Any, names: Any, nodes: list[str], work: float) -> None:
        from kubernetes import client as k8s

        self.cluster = cluster
        self.names = names
        self.nodes = set(nodes)
        self.work = work
        self.custom = k8s.CustomObjectsApi(cluster.api)
        self.core = k8s.CoreV1Api(cluster.api)
        self.lock = threading.Lock()
        self.started: dict[str, float] = {}
        self.finished: dict[str, float] = {}
        self.busy = 0
        self.max_busy = 0
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.due: list[tuple[float, str]] = []
        self.wake = threading.Condition(self.lock)
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="node")
        self.threads = [
            threading.Thread(target=self._watch, name="watch", daemon=True),
            threading.Thread(target=self._timer, name="timer", daemon=True),
        ]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def close(self) -> None:
        self.stop.set()
        with self.wake:
            self.wake.notify_all()
        self.pool.shutdown(wait=True, cancel_futures=True)

    def _watch(self) -> None:
        from kubernetes import watch as k8s_watch

        names = self.names
        resource_version = ""
        while not self.stop.is_set():
            watcher = k8s_watch.Watch()
            try:
                for event in watcher.stream(
                    self.custom.list_namespaced_custom_object,
                    names.GROUP,
                    names.VERSION,
                    names.DEFAULT_OSINSTANCE_NAMESPACE,
                    names.OSINSTANCE_PLURAL,
                    resource_version=resource_version or None,
                    timeout_seconds=60,
                ):
                    obj = event["object"]
                    resource_version = obj.get("metadata", {}).get("resourceVersion", resource_version)
                    if event["type"] in ("ADDED", "MODIFIED"):
                        self._seen(obj)
                    if self.stop.is_set():
                        break
            except Exception as exc:  # 410 Gone and the like: list again from scratch
                if not self.stop.is_set():
                    self.errors.append(f"watch: {exc}")
                resource_version = ""
            finally:
                watcher.stop()

    def _seen(self, obj: dict[str, Any]) -> None:
        name = obj["metadata"]["name"]
        if name not in self.nodes or (obj.get("spec") or {}).get("nodestatus") != "upgrade":
            return
        now = time.monotonic()
        with self.wake:
            if name in self.started:
                return
            self.started[name] = now
            self.busy += 1
            self.max_busy = max(self.max_busy, self.busy)
            heapq.heappush(self.due, (now + self.work, name))
            self.wake.notify()

    def _timer(self) -> None:
        while not self.stop.is_set():
            with self.wake:
                while not self.stop.is_set() and (not self.due or self.due[0][0] > time.monotonic()):
                    timeout = self.due[0][0] - time.monotonic() if self.due else None
                    self.wake.wait(timeout)
                if self.stop.is_set():
                    return
                _, name = heapq.heappop(self.due)
            self.pool.submit(self._finish, name)

    def _finish(self, name: str) -> None:
        names = self.names
        try:
            self.cluster.set_node_os_image(name, V2)
            self.custom.patch_namespaced_custom_object_status(
                names.GROUP,
                names.VERSION,
                names.DEFAULT_OSINSTANCE_NAMESPACE,
                names.OSINSTANCE_PLURAL,
                name,
                {"status": {"phase": "done", "os": f"{NAMESPACE}/fleet", "opstype": "upgrade", "target": V2}},
            )
            self.custom.patch_namespaced_custom_object(
                names.GROUP,
                names.VERSION,
                names.DEFAULT_OSINSTANCE_NAMESPACE,
                names.OSINSTANCE_PLURAL,
                name,
                {"spec": {"nodestatus": "idle"}},
            )
            self.core.patch_node(name, {"metadata": {"labels": {names.LABEL_UPGRADING: None}}})
        except Exception as exc:
            self.errors.append(f"{name}: {exc}")
            return
        with self.lock:
            self.finished[name] = time.monotonic()
            self.busy -= 1

    def mean_node_seconds(self) -> float:
        with self.lock:
            spans = [self.finished[n] - self.started[n] for n in self.finished]
        return sum(spans) / len(spans)


# --- the audit log ----------------------------------------------------------------------------------------------


def audit_counts(path: Path, user: str, since: float, until: float) -> collections.Counter[tuple[str, str]]:
    """Requests of ``user`` that completed in [since, until] (wall clock), by (verb, resource)."""
    import datetime

    counts: collections.Counter[tuple[str, str]] = collections.Counter()
    for line in path.read_text(errors="replace").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("user", {}).get("username") != user:
            continue
        stamp = datetime.datetime.fromisoformat(event["stageTimestamp"].replace("Z", "+00:00")).timestamp()
        if not since <= stamp <= until:
            continue
        ref = event.get("objectRef") or {}
        resource = ref.get("resource", "?") + (f"/{ref['subresource']}" if ref.get("subresource") else "")
        counts[(event.get("verb", "?"), resource)] += 1
    return counts


# --- the run ----------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def operator_process(kubeconfig: Path, workdir: Path, port: int) -> Iterator[subprocess.Popen[bytes]]:
    log_file = open(workdir / "operator.log", "ab")  # noqa: SIM115 - the process owns it
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kubeos_operator.operator",
            "--kubeconfig",
            str(kubeconfig),
            "--metrics-address",
            f"127.0.0.1:{port}",
            "--lease-namespace",
            "kubeos-system",
            "--identity",
            "bench-operator",
        ],
        stdout=log_file,
        stderr=log_file,
    )
    log_file.close()
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--max-unavailable", type=int, default=50)
    parser.add_argument("--work", type=float, default=20.0, help="seconds of simulated node-side work")
    parser.add_argument("--timeinterval", type=int, default=1, help="the OS object's timeinterval")
    parser.add_argument("--idle", type=float, default=30.0, help="seconds of idle CPU measurement")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, audit log)")
    args = parser.parse_args()

    from cluster.apiserver import build_kube_apiserver, free_port, running_cluster
    from cluster.fixtures import DEPLOY, kustomize
    from kubernetes import client as k8s

    from kubeos_operator import names

    workdir = Path(tempfile.mkdtemp(prefix="kubeos-operator-scale-", dir="/var/tmp"))
    audit_log = workdir / "audit.log"
    policy = workdir / "audit-policy.yaml"
    policy.write_text(AUDIT_POLICY.format(ns=OPERATOR_SA[0], name=OPERATOR_SA[1]))
    user = f"system:serviceaccount:{OPERATOR_SA[0]}:{OPERATOR_SA[1]}"
    n, k = args.nodes, args.max_unavailable
    try:
        binary = build_kube_apiserver()
        audit_args = [
            f"--audit-policy-file={policy}",
            f"--audit-log-path={audit_log}",
            "--audit-log-format=json",
            "--audit-log-maxsize=0",
        ]
        with running_cluster(workdir / "cluster", apiserver_binary=binary, extra_apiserver_args=audit_args) as cluster:
            log(f"API server {cluster.kube_version} up in {cluster.startup_seconds:.1f} s; workdir {workdir}")
            docs = [d for d in kustomize(DEPLOY / "kustomize" / "base") if d["kind"] not in ("Deployment", "DaemonSet")]
            cluster.apply(docs, field_manager="kubeos-deploy")
            cluster.ensure_namespace(NAMESPACE)
            node_names = [f"bench-n{i:04d}" for i in range(n)]
            t = time.monotonic()
            with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
                list(pool.map(lambda name: cluster.create_node(name, os_image=V1), node_names))
            log(f"{n} Nodes registered in {time.monotonic() - t:.1f} s")

            side = NodeSide(cluster, names, node_names, args.work)
            side.start()
            port = free_port()
            kubeconfig = cluster.kubeconfig_for_service_account(*OPERATOR_SA)
            with operator_process(kubeconfig, workdir, port) as operator:
                wait_for(lambda: _ready(port), 120, "the operator to be ready")
                time.sleep(3)  # leader election and the first (empty) rounds
                custom = k8s.CustomObjectsApi(cluster.api)
                body = {
                    "apiVersion": names.API_VERSION,
                    "kind": "OS",
                    "metadata": {"name": "fleet", "namespace": NAMESPACE},
                    "spec": {
                        "osversion": V2,
                        "imagetype": "disk",
                        "imageurl": "https://images.example.com/v2.img",
                        "checksum": "a" * 64,
                        "containerimage": "",
                        "opstype": "upgrade",
                        "maxunavailable": k,
                        "evictpodforce": False,
                        "flagSafe": False,
                        "mtls": False,
                        "timeinterval": args.timeinterval,
                    },
                }
                cpu0 = cpu_seconds(operator.pid)
                wall0 = time.time()
                t0 = time.monotonic()
                custom.create_namespaced_custom_object(names.GROUP, names.VERSION, NAMESPACE, names.OS_PLURAL, body)
                last_report = t0
                while True:
                    with side.lock:
                        done = len(side.finished)
                    if done == n:
                        break
                    if operator.poll() is not None:
                        raise SystemExit(f"the operator exited with {operator.returncode}; see {workdir}/operator.log")
                    if side.errors:
                        raise SystemExit(f"node side failed: {side.errors[:3]}")
                    if time.monotonic() - last_report > 30:
                        last_report = time.monotonic()
                        log(f"{done}/{n} nodes through, {side.busy} busy")
                    if time.monotonic() - t0 > 40 * math.ceil(n / k) * args.work + 600:
                        raise SystemExit(f"the rollout did not end; {done}/{n} nodes through")
                    time.sleep(0.05)
                makespan = time.monotonic() - t0
                wall1 = time.time()
                cpu_rollout = cpu_seconds(operator.pid) - cpu0
                log(f"rollout complete in {makespan:.1f} s; settling, then {args.idle:g} s of idle measurement")
                wait_for(lambda: _os_complete(custom, names, n), 60, "the OS status to say Complete")
                time.sleep(5)
                cpu_i0, idle0 = cpu_seconds(operator.pid), time.monotonic()
                time.sleep(args.idle)
                idle_cpu = (cpu_seconds(operator.pid) - cpu_i0) / (time.monotonic() - idle0)
                rss = peak_rss_mib(operator.pid)
            side.close()
            nodes_on_v2 = sum(1 for node in cluster.core.list_node().items if node.status.node_info.os_image == V2)
            labelled = sum(
                1 for node in cluster.core.list_node().items if names.LABEL_UPGRADING in (node.metadata.labels or {})
            )
        t_node = side.mean_node_seconds()
        ideal = math.ceil(n / k) * t_node
        counts = audit_counts(audit_log, user, wall0, wall1)
        writes = sum(c for (verb, _), c in counts.items() if verb in WRITE_VERBS)
        reads = sum(c for (verb, _), c in counts.items() if verb not in WRITE_VERBS)

        print()
        print(f"nodes {n}, maxunavailable {k}, work {args.work:g} s, timeinterval {args.timeinterval} s")
        print(f"nodes on {V2} at the end: {nodes_on_v2}/{n}; operation labels left: {labelled}")
        print(f"most nodes busy at once: {side.max_busy} (limit {k})")
        print(f"per-node time measured by the node side: {t_node:.2f} s")
        print(f"makespan {makespan:.1f} s, ideal ceil({n}/{k}) x {t_node:.2f} s = {ideal:.1f} s")
        print(f"operator API requests during the rollout: {writes} writes, {reads} reads")
        for (verb, resource), count in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
            kind = "write" if verb in WRITE_VERBS else "read"
            print(f"  {kind:5} {verb:8} {resource:28} {count:6}  {count / n:.3f} per node")
        print(f"writes per node transition: {writes / n:.3f}; reads per node transition: {reads / n:.3f}")
        print(f"operator CPU during the rollout: {cpu_rollout:.1f} s ({cpu_rollout / n * 1000:.1f} ms per node)")
        print(f"operator CPU while idle: {idle_cpu * 100:.2f} % of one core")
        print(f"operator peak RSS: {rss:.0f} MiB")
        if side.max_busy > k:
            print(f"LIMIT EXCEEDED: {side.max_busy} nodes busy at once, maxunavailable is {k}")
        print(f"makespan_ratio {makespan / ideal:.3f}")
        return 0 if side.max_busy <= k and nodes_on_v2 == n else 1
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _ready(port: int) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def _os_complete(custom: Any, names: Any, n: int) -> bool:
    obj = custom.get_namespaced_custom_object(names.GROUP, names.VERSION, NAMESPACE, names.OS_PLURAL, "fleet")
    status = obj.get("status") or {}
    complete: dict[str, Any] = next((c for c in status.get("conditions") or [] if c.get("type") == "Complete"), {})
    return complete.get("status") == "True" and status.get("updated") == n


if __name__ == "__main__":
    sys.exit(main())
