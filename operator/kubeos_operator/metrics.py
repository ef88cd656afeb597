"""Prometheus metrics and the health endpoints of the operator (``/metrics``, ``/healthz``, ``/readyz``)."""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    """The operator's metrics, in their own registry (no process-wide global state)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.nodes_by_phase = Gauge(
            "kubeos_nodes",
            "Nodes selected by an OS object, by the phase their OSInstance reports.",
            ["os", "phase"],
            registry=self.registry,
        )
        self.os_nodes = Gauge(
            "kubeos_os_nodes",
            "Node counts of an OS object (matching, updated, in_progress, failed).",
            ["os", "state"],
            registry=self.registry,
        )
        self.operations = Counter(
            "kubeos_node_operations",
            "Node operations that ended, by result (done or failed).",
            ["os", "opstype", "result"],
            registry=self.registry,
        )
        self.failures = Counter(
            "kubeos_node_failures", "Node operations that ended failed.", ["os", "opstype"], registry=self.registry
        )
        self.rollbacks = Counter(
            "kubeos_rollbacks",
            "Rollbacks: requested (opstype rollback) or automatic (the new slot failed its checks or its boots).",
            ["os", "kind"],
            registry=self.registry,
        )
        self.durations = Histogram(
            "kubeos_node_operation_duration_seconds",
            "Time from the start of a node's operation to its end.",
            ["os", "opstype", "result"],
            buckets=(30, 60, 120, 300, 600, 900, 1800, 3600, 7200),
            registry=self.registry,
        )
        self.assignments = Counter(
            "kubeos_assignments", "Nodes handed an operation by the operator.", ["os"], registry=self.registry
        )
        self.rounds = Counter("kubeos_scheduling_rounds", "Scheduling rounds run.", ["os"], registry=self.registry)
        self.rounds_skipped = Counter(
            "kubeos_scheduling_rounds_skipped",
            "Rounds of a settled OS object skipped because nothing it reads changed.",
            ["os"],
            registry=self.registry,
        )
        self.round_errors = Counter(
            "kubeos_scheduling_round_errors", "Scheduling rounds that failed.", ["os"], registry=self.registry
        )
        self.conflicts = Counter(
            "kubeos_status_conflicts", "Status writes refused with 409 (redone next round).", registry=self.registry
        )
        self.leader = Gauge("kubeos_operator_leader", "1 while this instance holds the Lease.", registry=self.registry)

    def forget_os(self, os_key: str) -> None:
        for gauge in (self.nodes_by_phase, self.os_nodes):
            for labels in list(gauge._metrics):  # prometheus_client keeps children by label tuple
                if labels and labels[0] == os_key:
                    gauge.remove(*labels)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class HealthState:
    """``/healthz``: the scheduler loop ticked recently; ``/readyz``: started (watches running)."""

    def __init__(self, stale_after: float = 60.0) -> None:
        self.stale_after = stale_after
        self.ready = threading.Event()
        self._tick = time.monotonic()

    def tick(self) -> None:
        self._tick = time.monotonic()

    @property
    def alive(self) -> bool:
        return time.monotonic() - self._tick < self.stale_after


def serve(
    host: str, port: int, metrics: Callable[[], bytes], health: HealthState
) -> tuple[http.server.ThreadingHTTPServer, threading.Thread]:
    """Serve the three endpoints from a daemon thread; the caller shuts the server down."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def _send(self, code: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, metrics(), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                ok = health.alive
                self._send(200 if ok else 503, b"ok\n" if ok else b"scheduler loop stalled\n")
            elif path == "/readyz":
                ok = health.ready.is_set()
                self._send(200 if ok else 503, b"ok\n" if ok else b"starting\n")
            else:
                self._send(404, b"not found\n")

    server = http.server.ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.5}, daemon=True)
    thread.start()
    return server, thread
