"""Draining a node with the Eviction API, the way ``kubectl drain`` does, with KubeOS's ``evictpodforce``.

- DaemonSet pods and mirror (static) pods are left alone: evicting them is pointless, their controller or
  the kubelet puts them right back; the proxy's own pod is a DaemonSet pod and never blocks the drain.
- Pods without a controller, or with ``emptyDir`` data, block the drain unless ``evictpodforce`` is true
  (their data or the pod itself would be lost for good); the reason lists them.
- Every other pod is evicted; a PodDisruptionBudget that refuses (429) is asked again until the drain
  timeout, which then aborts the drain saying which pods and which budgets held it up.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

log = logging.getLogger(__name__)

MIRROR_ANNOTATION = "kubernetes.io/config.mirror"


@dataclass(frozen=True)
class PodView:
    namespace: str
    name: str
    uid: str = ""
    phase: str = ""
    controller_kind: str = ""
    mirror: bool = False
    empty_dir: bool = False
    deleting: bool = False

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> PodView:
        meta = obj.get("metadata") or {}
        spec = obj.get("spec") or {}
        controller = next((o for o in meta.get("ownerReferences") or [] if o.get("controller")), None)
        return cls(
            namespace=str(meta.get("namespace") or ""),
            name=str(meta.get("name") or ""),
            uid=str(meta.get("uid") or ""),
            phase=str((obj.get("status") or {}).get("phase") or ""),
            controller_kind=str(controller.get("kind") or "") if controller else "",
            mirror=MIRROR_ANNOTATION in (meta.get("annotations") or {}),
            empty_dir=any("emptyDir" in (v or {}) for v in spec.get("volumes") or []),
            deleting=bool(meta.get("deletionTimestamp")),
        )

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass
class DrainPlan:
    evict: list[PodView] = field(default_factory=list)
    skip: list[PodView] = field(default_factory=list)
    blocking: list[tuple[PodView, str]] = field(default_factory=list)
    terminating: list[PodView] = field(default_factory=list)


def classify(pods: list[PodView], *, force: bool, own_pod: str = "") -> DrainPlan:
    """Sort the node's pods into evict / skip / blocking (with why) / already terminating."""
    plan = DrainPlan()
    for pod in pods:
        if pod.phase in ("Succeeded", "Failed"):
            continue  # finished: nothing runs, nothing to move
        if pod.key == own_pod or pod.mirror or pod.controller_kind == "DaemonSet":
            plan.skip.append(pod)
            continue
        if pod.deleting:
            plan.terminating.append(pod)
            continue
        if not force:
            if not pod.controller_kind:
                plan.blocking.append((pod, "no controller would recreate it"))
                continue
            if pod.empty_dir:
                plan.blocking.append((pod, "its emptyDir data would be lost"))
                continue
        plan.evict.append(pod)
    return plan


@dataclass
class DrainResult:
    ok: bool
    reason: str = ""
    evicted: list[str] = field(default_factory=list)


class Drainer:
    def __init__(self, api: k8s.ApiClient, poll: float = 1.0) -> None:
        self.core = k8s.CoreV1Api(api)
        self.poll = poll

    def pods_on(self, node: str) -> list[PodView]:
        resp: Any = self.core.list_pod_for_all_namespaces(
            field_selector=f"spec.nodeName={node}", _preload_content=False
        )
        return [PodView.from_dict(item) for item in json.loads(resp.data).get("items") or []]

    def _evict(self, pod: PodView) -> tuple[bool, str]:
        """(done, why not): done when the eviction was accepted or the pod is gone."""
        body: Any = {
            "apiVersion": "policy/v1",
            "kind": "Eviction",
            "metadata": {"name": pod.name, "namespace": pod.namespace},
            "deleteOptions": {"preconditions": {"uid": pod.uid}} if pod.uid else {},
        }
        try:
            self.core.create_namespaced_pod_eviction(pod.name, pod.namespace, body)
        except ApiException as exc:
            if exc.status == 404:
                return True, ""
            if exc.status == 429:
                return False, _message(exc) or "a PodDisruptionBudget does not allow it now"
            if exc.status == 409:
                return True, ""  # uid precondition: the pod was replaced meanwhile
            return False, f"eviction refused ({exc.status}): {_message(exc) or exc.reason}"
        return True, ""

    def drain(
        self,
        node: str,
        *,
        force: bool,
        timeout: float,
        own_pod: str = "",
        stop: threading.Event | None = None,
        on_progress: Callable[[str], None] | None = None,
    ) -> DrainResult:
        deadline = time.monotonic() + timeout
        evicted: list[str] = []
        refused: dict[str, str] = {}
        while True:
            plan = classify(self.pods_on(node), force=force, own_pod=own_pod)
            if plan.blocking:
                what = ", ".join(f"{p.key} ({why})" for p, why in plan.blocking)
                return DrainResult(
                    False, f"pods block the drain: {what}; set evictpodforce: true to evict them anyway", evicted
                )
            if not plan.evict and not plan.terminating:
                return DrainResult(True, "", evicted)
            for pod in plan.evict:
                done, why = self._evict(pod)
                if done:
                    refused.pop(pod.key, None)
                    if pod.key not in evicted:
                        evicted.append(pod.key)
                else:
                    refused[pod.key] = why
            left = len(plan.evict) + len(plan.terminating)
            if on_progress is not None:
                on_progress(f"draining: {left} pod(s) left, {len(evicted)} evicted")
            if time.monotonic() >= deadline:
                waiting = [f"{k} ({why})" for k, why in sorted(refused.items())]
                waiting += [f"{p.key} (terminating)" for p in plan.terminating]
                waiting += [f"{p.key}" for p in plan.evict if p.key not in refused and p.key not in evicted]
                return DrainResult(
                    False, f"drain timed out after {timeout:g}s; still on the node: {', '.join(waiting)}", evicted
                )
            if stop is not None and stop.wait(self.poll):
                return DrainResult(False, "the proxy is stopping", evicted)
            if stop is None:
                time.sleep(self.poll)


def _message(exc: ApiException) -> str:
    try:
        return str(json.loads(exc.body or "{}").get("message") or "")
    except (ValueError, AttributeError):
        return ""
