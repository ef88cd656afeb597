"""Leader election on a coordination.k8s.io Lease: one operator instance schedules at a time.

The holder renews the Lease every round; another instance takes it over only after ``duration`` seconds
without a renewal. Every write carries the ``resourceVersion`` it read, so two candidates racing for an
expired Lease cannot both win (the loser gets 409). A leader that cannot renew stops scheduling at once
(``is_leader`` turns false before the Lease can expire for the others).
"""

from __future__ import annotations

import datetime
import json
import logging
from typing import Any

from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

log = logging.getLogger(__name__)

MERGE = "application/merge-patch+json"


def _micro(ts: datetime.datetime) -> str:
    return ts.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse(text: str | None) -> datetime.datetime | None:
    if not text:
        return None
    try:
        return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


class LeaderElection:
    def __init__(self, api: k8s.ApiClient, namespace: str, name: str, identity: str, duration: int = 15) -> None:
        self.coordination = k8s.CoordinationV1Api(api)
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.duration = duration
        self._renewed: datetime.datetime | None = None

    @property
    def is_leader(self) -> bool:
        """Held, and renewed recently enough that no one else can have taken it over."""
        if self._renewed is None:
            return False
        age = (datetime.datetime.now(datetime.UTC) - self._renewed).total_seconds()
        return age < self.duration * 2 / 3

    def _body(self, now: datetime.datetime, acquired: bool, transitions: int) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": self.duration,
            "renewTime": _micro(now),
        }
        if acquired:
            spec["acquireTime"] = _micro(now)
            spec["leaseTransitions"] = transitions
        return spec

    def try_acquire_or_renew(self) -> bool:
        try:
            return self._try()
        except Exception as exc:  # API server unreachable (connection refused, timeouts): not leading
            log.warning("cannot reach the API server for lease %s/%s: %s", self.namespace, self.name, exc)
            self._renewed = None
            return False

    def _try(self) -> bool:
        now = datetime.datetime.now(datetime.UTC)
        try:
            resp: Any = self.coordination.read_namespaced_lease(self.name, self.namespace, _preload_content=False)
            lease = json.loads(resp.data)
        except ApiException as exc:
            if exc.status != 404:
                log.warning("cannot read lease %s/%s: %s", self.namespace, self.name, exc.reason)
                self._renewed = None
                return False
            body: Any = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": self._body(now, True, 0),
            }
            try:
                self.coordination.create_namespaced_lease(self.namespace, body)
            except ApiException as create_exc:
                log.info("lease %s/%s taken by another instance (%s)", self.namespace, self.name, create_exc.reason)
                self._renewed = None
                return False
            log.info("became leader (lease %s/%s created)", self.namespace, self.name)
            self._renewed = now
            return True
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity") or ""
        renewed = _parse(spec.get("renewTime")) or _parse(spec.get("acquireTime"))
        duration = int(spec.get("leaseDurationSeconds") or self.duration)
        expired = renewed is None or (now - renewed).total_seconds() > duration
        if holder and holder != self.identity and not expired:
            self._renewed = None
            return False
        taking_over = holder != self.identity
        transitions = int(spec.get("leaseTransitions") or 0) + (1 if taking_over and holder else 0)
        patch = {
            "metadata": {"resourceVersion": lease["metadata"]["resourceVersion"]},
            "spec": self._body(now, taking_over, transitions),
        }
        try:
            self.coordination.patch_namespaced_lease(self.name, self.namespace, patch, _content_type=MERGE)
        except ApiException as exc:
            log.info("lost the race for lease %s/%s (%s)", self.namespace, self.name, exc.reason)
            self._renewed = None
            return False
        if taking_over:
            log.info("became leader (lease %s/%s, previous holder %r)", self.namespace, self.name, holder)
        self._renewed = now
        return True

    def release(self) -> None:
        """Give the Lease up on a clean stop, so a successor need not wait for it to expire."""
        if self._renewed is None:
            return
        self._renewed = None
        try:
            self.coordination.patch_namespaced_lease(
                self.name, self.namespace, {"spec": {"holderIdentity": None, "renewTime": None}}, _content_type=MERGE
            )
        except Exception as exc:  # best effort: the Lease expires by itself
            log.warning("cannot release lease %s/%s: %s", self.namespace, self.name, exc)
