"""os-operator: runs scheduling rounds for every OS object and applies their plans.

kopf watches the OS objects and the Nodes (reconnects, 410 Gone, backoff: all kopf's); its handlers only
keep the set of OS objects current and delete the OSInstance of a deleted Node. The rounds themselves run
in one scheduler thread, each OS object every ``timeinterval`` seconds, and each round reads the OS object,
the Nodes and the OSInstances afresh from the API (never from remembered events), computes a plan with
:func:`scheduling.plan_round`, and applies it: the OSInstance spec first, then the Node label, then Events,
then the OS status, written with the resourceVersion it was computed from (409: done again next round).

Only the holder of the Lease schedules (``--leader-election``, on by default), so a second replica, or a
new Pod started while the old one is still terminating, cannot exceed ``maxunavailable``.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os as _os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import kopf

from . import names
from .kube import Conflict, Kube, NotFound, api_client
from .leader import LeaderElection
from .metrics import HealthState, Metrics, serve
from .models import OS, NodeView, OSInstance, Phase
from .scheduling import EventSpec, Plan, plan_round

log = logging.getLogger("kubeos_operator")

# A settled OS object (see Scheduler) gets a full round at least this often, and checks this often whether
# anything changed (a dictionary lookup, no API call).
RESYNC_SECONDS = 300.0
SETTLED_POLL_SECONDS = 1.0


@dataclass
class Settings:
    osinstance_namespace: str = names.DEFAULT_OSINSTANCE_NAMESPACE
    metrics_host: str = "0.0.0.0"
    metrics_port: int = 8080
    leader_election: bool = True
    lease_namespace: str = "kubeos-system"
    lease_name: str = "kubeos-operator"
    lease_duration: int = 15
    identity: str = ""


class Scheduler:
    """The rounds: which OS objects exist, when each is due, and applying one round's plan."""

    def __init__(self, kube: Kube, metrics: Metrics, health: HealthState, leader: LeaderElection | None) -> None:
        self.kube = kube
        self.metrics = metrics
        self.health = health
        self.leader = leader
        self.wake = threading.Event()
        self._lock = threading.Lock()
        self._due: dict[tuple[str, str], float] = {}
        self._finished_seen: set[tuple[str, str, str]] = set()
        self._history_loaded = False
        self._next_renew = 0.0
        # Settled OS objects (nothing busy, nothing left to start) skip their rounds until something they
        # read changes: ``_changes`` counts relevant Node and OSInstance events, ``_settled`` holds its value
        # when each settled round began. An idle operator then reads nothing; every RESYNC_SECONDS a full
        # round runs anyway, in case a watch missed something.
        self._changes = 0
        self._settled: dict[tuple[str, str], tuple[int, float]] = {}
        self._generations: dict[tuple[str, str], int] = {}
        self._node_prints: dict[str, tuple[Any, ...]] = {}

    # --- fed by the kopf handlers --------------------------------------------------------------------------

    def os_seen(self, namespace: str, name: str, generation: int) -> None:
        """An OS object event: a new object or a new spec (``metadata.generation``) gets a round at once;
        the operator's own status writes do not."""
        key = (namespace, name)
        with self._lock:
            known = key in self._due
            changed = self._generations.get(key) != generation
            self._generations[key] = generation
            if changed:
                self._settled.pop(key, None)
            if not known or changed:
                self._due[key] = 0.0
        if not known or changed:
            self.wake.set()

    def os_gone(self, namespace: str, name: str) -> None:
        with self._lock:
            self._due.pop((namespace, name), None)
            self._settled.pop((namespace, name), None)
            self._generations.pop((namespace, name), None)
        self.metrics.forget_os(f"{namespace}/{name}")

    def node_seen(self, body: dict[str, Any]) -> None:
        """A Node event: counts as a change only when something scheduling reads of it changed."""
        node = NodeView.from_dict(body)
        fingerprint = node.fingerprint()
        with self._lock:
            if self._node_prints.get(node.name) != fingerprint:
                self._node_prints[node.name] = fingerprint
                self._changes += 1

    def node_gone(self, name: str) -> None:
        with self._lock:
            self._node_prints.pop(name, None)
            self._changes += 1
        if self.kube.delete_osinstance(name):
            log.info("deleted OSInstance %s/%s: its Node is gone", self.kube.namespace, name)

    def osinstance_changed(self) -> None:
        with self._lock:
            self._changes += 1

    # --- the loop -----------------------------------------------------------------------------------------------

    @property
    def leading(self) -> bool:
        return self.leader is None or self.leader.is_leader

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self._tick(stop)
            except Exception:  # the loop must outlive any one failure (the API server may be away)
                log.exception("scheduler tick failed; going on in 2 s")
                stop.wait(2.0)

    def _tick(self, stop: threading.Event) -> None:
        self.health.tick()
        now = time.monotonic()
        if self.leader is not None and now >= self._next_renew:
            self.leader.try_acquire_or_renew()
            self._next_renew = now + max(1.0, self.leader.duration / 3)
        self.metrics.leader.set(1 if self.leading else 0)
        if self.leading:
            with self._lock:
                due = [key for key, at in self._due.items() if at <= now]
            for namespace, name in due:
                if stop.is_set() or not self.leading:
                    break
                started = time.monotonic()
                requeue = self.round(namespace, name)
                with self._lock:
                    if (namespace, name) in self._due:
                        # timeinterval counts from the start of one round to the start of the next (a round
                        # of a large cluster takes a good part of a second: it must not stretch the interval).
                        self._due[(namespace, name)] = max(started + requeue, time.monotonic() + 0.05)
        with self._lock:
            next_due = min(self._due.values(), default=now + 5.0)
        wait = max(0.05, min(next_due, self._next_renew if self.leader else next_due, now + 5.0) - time.monotonic())
        self.wake.wait(wait)
        self.wake.clear()

    def round(self, namespace: str, name: str) -> float:
        """One round for one OS object; returns the seconds until the next."""
        key = f"{namespace}/{name}"
        now = time.monotonic()
        with self._lock:
            changes = self._changes
            settled = self._settled.get((namespace, name))
        if settled is not None and settled[0] == changes and now - settled[1] < RESYNC_SECONDS:
            self.metrics.rounds_skipped.labels(key).inc()
            return SETTLED_POLL_SECONDS
        try:
            os = self.kube.get_os(namespace, name)
        except NotFound:
            self.os_gone(namespace, name)
            return 3600.0
        except Exception as exc:
            log.warning("round %s: cannot read the OS object: %s", key, exc)
            self.metrics.round_errors.labels(key).inc()
            return 5.0
        try:
            plan = self._round(os)
        except Exception as exc:  # ApiException, connection errors: the round is redone from scratch
            log.warning("round %s failed, retried in 5 s: %s", key, exc)
            self.metrics.round_errors.labels(key).inc()
            return 5.0
        self.metrics.rounds.labels(key).inc()
        with self._lock:
            if plan.settled and (namespace, name) in self._due:
                self._settled[(namespace, name)] = (changes, now)
            else:
                self._settled.pop((namespace, name), None)
        return plan.requeue_after

    def _round(self, os: OS) -> Plan:
        all_os = self.kube.list_os()
        nodes = self.kube.list_nodes()
        instances = self.kube.list_osinstances()
        node_names = {n.name for n in nodes}
        for orphan in sorted(set(instances) - node_names):
            # Missed the Node's deletion (operator down at the time): same cleanup, level-based.
            if self.kube.delete_osinstance(orphan):
                log.info("deleted OSInstance %s: no Node of that name", orphan)
            instances.pop(orphan, None)
        plan = plan_round(os, all_os, nodes, instances, datetime.datetime.now())
        self._apply(os, plan, instances)
        self._observe(os, plan, instances)
        return plan

    def _apply(self, os: OS, plan: Plan, instances: dict[str, OSInstance]) -> None:
        for change in plan.labels:
            self.kube.patch_node_labels(change.node, change.add, change.remove)
        for event in plan.events:
            self._record(os, event)
        for a in plan.assignments:
            try:
                existing = instances.get(a.node)
                if existing is None:
                    self.kube.create_osinstance(a.node, a.spec)
                else:
                    # Guarded by the resourceVersion read this round: a proxy write in between wins.
                    self.kube.patch_osinstance_spec(a.node, a.spec.to_dict(), existing.resource_version)
            except Conflict:
                # Created or changed by the proxy meanwhile. Stop here: the plan's later assignments assumed
                # this one; the next round computes again from what is there.
                log.info("OSInstance %s changed meanwhile; assignments left to the next round", a.node)
                break
            self.kube.patch_node_labels(a.node, {a.label: ""})
            self.metrics.assignments.labels(os.key).inc()
            for event in a.events:
                self._record(os, event)
        if plan.status == os.status:
            return  # nothing changed: an idle rollout costs no writes
        try:
            self.kube.patch_os_status(os, plan.status.to_dict())
        except Conflict:
            self.metrics.conflicts.inc()
            log.debug("status of %s changed meanwhile; written next round", os.key)
        except NotFound:
            pass

    def _record(self, os: OS, event: EventSpec) -> None:
        if event.kind == "OS":
            self.kube.record_event(
                kind="OS",
                name=os.name,
                namespace=os.namespace,
                uid=os.uid,
                type_=event.type,
                reason=event.reason,
                message=event.message,
                component=names.OPERATOR_COMPONENT,
                api_version=names.API_VERSION,
            )
        else:
            self.kube.record_event(
                kind="Node",
                name=event.name,
                namespace="",
                uid=event.uid,
                type_=event.type,
                reason=event.reason,
                message=event.message,
                component=names.OPERATOR_COMPONENT,
            )
        log.info("%s %s/%s: %s: %s", event.type, event.kind, event.name, event.reason, event.message)

    def _observe(self, os: OS, plan: Plan, instances: dict[str, OSInstance]) -> None:
        key = os.key
        status = plan.status
        for state, value in (
            ("matching", status.matching),
            ("updated", status.updated),
            ("in_progress", status.inProgress),
            ("failed", status.failed),
        ):
            self.metrics.os_nodes.labels(key, state).set(value)
        mine = [i for i in instances.values() if i.status.os == key or i.spec.namespacedname.key == key]
        for phase in Phase:
            self.metrics.nodes_by_phase.labels(key, phase.value).set(
                sum(1 for i in mine if i.status.phase == phase.value)
            )
        for inst in mine:
            s = inst.status
            if s.phase not in (Phase.DONE, Phase.FAILED) or not s.finishedAt:
                continue
            seen = (inst.name, s.startedAt, s.finishedAt)
            if seen in self._finished_seen:
                continue
            self._finished_seen.add(seen)
            if not self._history_loaded:
                continue  # finished before this operator started: not counted again
            result = "done" if s.phase == Phase.DONE else "failed"
            self.metrics.operations.labels(key, s.opstype, result).inc()
            if result == "failed":
                self.metrics.failures.labels(key, s.opstype).inc()
            if s.opstype == "rollback" and result == "done":
                self.metrics.rollbacks.labels(key, "requested").inc()
            if s.lastError.startswith(("rolled-back", "fell-back")):
                self.metrics.rollbacks.labels(key, "automatic").inc()
            started, finished = _ts(s.startedAt), _ts(s.finishedAt)
            if started is not None and finished is not None:
                self.metrics.durations.labels(key, s.opstype, result).observe(max(0.0, finished - started))
        self._history_loaded = True


def _ts(text: str) -> float | None:
    try:
        return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def build_registry(scheduler: Scheduler, health: HealthState) -> kopf.OperatorRegistry:
    """kopf handlers: feed the scheduler; nothing is decided here."""
    registry = kopf.OperatorRegistry()

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        # The very credentials of our own client: one configuration, one identity for both.
        return connection_info(scheduler.kube.api)

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.peering.standalone = True  # leader election is our own Lease (leader.py)
        settings.posting.level = logging.WARNING
        settings.watching.server_timeout = 300
        settings.watching.client_timeout = 330
        settings.networking.request_timeout = 60
        health.ready.set()

    @kopf.on.event(names.GROUP, names.VERSION, names.OS_PLURAL, registry=registry)
    def os_event(**kwargs: Any) -> None:
        name, namespace = str(kwargs["name"]), str(kwargs["namespace"])
        if kwargs["type"] == "DELETED":
            scheduler.os_gone(namespace, name)
        else:
            generation = kwargs["body"].get("metadata", {}).get("generation") or 0
            scheduler.os_seen(namespace, name, int(generation))

    @kopf.on.event("", "v1", "nodes", registry=registry)
    def node_event(**kwargs: Any) -> None:
        if kwargs["type"] == "DELETED":
            scheduler.node_gone(str(kwargs["name"]))
        else:
            scheduler.node_seen(dict(kwargs["body"]))

    @kopf.on.event(names.GROUP, names.VERSION, names.OSINSTANCE_PLURAL, registry=registry)
    def osinstance_event(**kwargs: Any) -> None:
        if kwargs["namespace"] == scheduler.kube.namespace:
            scheduler.osinstance_changed()

    return registry


def connection_info(api: Any) -> kopf.ConnectionInfo:
    """kopf's credentials from a ``kubernetes`` client (server, CA, client certificate or bearer token)."""
    conf = api.configuration
    header = conf.get_api_key_with_prefix("BearerToken") or conf.get_api_key_with_prefix("authorization") or ""
    scheme, _, token = header.partition(" ") if " " in header else ("Bearer", "", header)
    return kopf.ConnectionInfo(
        server=conf.host,
        ca_path=conf.ssl_ca_cert or None,
        insecure=not conf.verify_ssl,
        scheme=scheme if token else None,
        token=token or None,
        certificate_path=conf.cert_file or None,
        private_key_path=conf.key_file or None,
    )


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Settings]:
    env = _os.environ.get
    parser = argparse.ArgumentParser(prog="kubeos-operator", description=__doc__.split("\n", 1)[0])
    parser.add_argument("--kubeconfig", default=env("KUBECONFIG"))
    parser.add_argument(
        "--osinstance-namespace", default=env("KUBEOS_OSINSTANCE_NAMESPACE", names.DEFAULT_OSINSTANCE_NAMESPACE)
    )
    parser.add_argument("--metrics-address", default=env("KUBEOS_METRICS_ADDRESS", "0.0.0.0:8080"))
    parser.add_argument("--leader-election", default=env("KUBEOS_LEADER_ELECTION", "true"), choices=["true", "false"])
    parser.add_argument("--lease-namespace", default=env("POD_NAMESPACE", "kubeos-system"))
    parser.add_argument("--lease-name", default="kubeos-operator")
    parser.add_argument("--lease-duration", type=int, default=15)
    parser.add_argument("--identity", default=env("POD_NAME") or f"{socket.gethostname()}-{_os.getpid()}")
    parser.add_argument("--log-level", default=env("KUBEOS_LOG_LEVEL", "info"))
    args = parser.parse_args(argv)
    host, _, port = args.metrics_address.rpartition(":")
    settings = Settings(
        osinstance_namespace=args.osinstance_namespace,
        metrics_host=host or "0.0.0.0",
        metrics_port=int(port),
        leader_election=args.leader_election == "true",
        lease_namespace=args.lease_namespace,
        lease_name=args.lease_name,
        lease_duration=args.lease_duration,
        identity=args.identity,
    )
    return args, settings


def main(argv: list[str] | None = None) -> int:
    args, settings = parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("kubernetes").setLevel(logging.WARNING)
    # kopf logs every handler call at INFO; the decisions are logged (and recorded as Events) by us.
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    api = api_client(args.kubeconfig)
    kube = Kube(api, settings.osinstance_namespace)
    metrics = Metrics()
    health = HealthState()
    leader = (
        LeaderElection(api, settings.lease_namespace, settings.lease_name, settings.identity, settings.lease_duration)
        if settings.leader_election
        else None
    )
    scheduler = Scheduler(kube, metrics, health, leader)
    server, _ = serve(settings.metrics_host, settings.metrics_port, metrics.exposition, health)
    stop = threading.Event()
    loop = threading.Thread(target=scheduler.run, args=(stop,), name="scheduler", daemon=True)
    loop.start()
    log.info(
        "kubeos-operator %s: OSInstances in %s, metrics on %s:%d, leader election %s",
        settings.identity,
        settings.osinstance_namespace,
        settings.metrics_host,
        settings.metrics_port,
        f"on (lease {settings.lease_namespace}/{settings.lease_name})" if leader else "off (one replica only)",
    )
    try:
        kopf.run(registry=build_registry(scheduler, health), standalone=True, clusterwide=True)
    finally:
        stop.set()
        scheduler.wake.set()
        loop.join(timeout=30)
        if leader is not None:
            leader.release()
        server.shutdown()
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
