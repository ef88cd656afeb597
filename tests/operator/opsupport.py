"""Helpers of the operator and proxy tests (importable as ``opsupport`` from this directory): deploy/'s
manifests, KubeOS-style OS objects, and reading OS and OSInstance status back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cluster.apiserver import Cluster
from cluster.fixtures import DEPLOY, REPO, kustomize
from kubernetes import client as k8s
from simnodes import V2

from kubeos_operator import names

MANIFESTS = Path(__file__).parent / "manifests"

__all__ = [
    "DEPLOY",
    "MANIFESTS",
    "REPO",
    "cond",
    "instance_status",
    "kustomize",
    "node_events",
    "os_manifest",
    "os_status",
    "osinstance",
]


def os_manifest(name: str, namespace: str, **spec: Any) -> dict[str, Any]:
    """A KubeOS-style OS object: the KubeOS fields (an upgrade to ``V2``, two nodes at a time, a round every
    second), and whatever the test adds or overrides, kubeos's additions included."""
    body = {
        "osversion": V2,
        "imagetype": "disk",
        "imageurl": "https://images.example.com/v2.img",
        "checksum": "a" * 64,
        "containerimage": "",
        "opstype": "upgrade",
        "maxunavailable": 2,
        "evictpodforce": False,
        "flagSafe": False,
        "mtls": False,
        "timeinterval": 1,
        **spec,
    }
    return {
        "apiVersion": names.API_VERSION,
        "kind": "OS",
        "metadata": {"name": name, "namespace": namespace},
        "spec": body,
    }


def os_status(cluster: Cluster, namespace: str, name: str) -> dict[str, Any]:
    obj = k8s.CustomObjectsApi(cluster.api).get_namespaced_custom_object(
        names.GROUP, names.VERSION, namespace, names.OS_PLURAL, name
    )
    return dict(obj.get("status") or {})


def cond(status: dict[str, Any], kind: str) -> tuple[str, str]:
    """(status, reason) of condition ``kind`` ("", "" when it is not there)."""
    c = next((c for c in status.get("conditions") or [] if c["type"] == kind), {})
    return c.get("status", ""), c.get("reason", "")


def osinstance(cluster: Cluster, node: str) -> dict[str, Any]:
    return dict(
        k8s.CustomObjectsApi(cluster.api).get_namespaced_custom_object(
            names.GROUP, names.VERSION, names.DEFAULT_OSINSTANCE_NAMESPACE, names.OSINSTANCE_PLURAL, node
        )
    )


def instance_status(cluster: Cluster, node: str) -> dict[str, Any]:
    try:
        return dict(osinstance(cluster, node).get("status") or {})
    except k8s.ApiException as exc:
        if exc.status == 404:  # the proxy has not created it yet
            return {}
        raise


def node_events(cluster: Cluster, node: str) -> list[Any]:
    return [e for e in cluster.core.list_namespaced_event("default").items if e.involved_object.name == node]
