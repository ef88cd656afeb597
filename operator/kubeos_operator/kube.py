"""The Kubernetes API calls of the operator and the proxy, over the ``kubernetes`` client.

Reads return plain JSON (``_preload_content=False``), turned into the typed views of :mod:`models`: the
client's own models refuse objects that lack fields they deem required, and a scheduling round must not
fail because some Node is odd. Writes are merge patches that name exactly the fields they change; status
writes carry the ``resourceVersion`` they were computed from, so a write based on stale data fails with
:class:`Conflict` (409) and the round is simply done again later.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import uuid
from collections.abc import Mapping
from typing import Any

from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException

from . import names
from .models import OS, NodeView, OSInstance, OSInstanceSpec

log = logging.getLogger(__name__)

MERGE = "application/merge-patch+json"


class Conflict(Exception):
    """The object changed since it was read (409): compute again from fresh data."""


class NotFound(Exception):
    pass


def _json(resp: Any) -> dict[str, Any]:
    data = json.loads(resp.data)
    return data if isinstance(data, dict) else {}


def _translate(exc: ApiException) -> Exception:
    if exc.status == 409:
        return Conflict(str(exc.reason))
    if exc.status == 404:
        return NotFound(str(exc.reason))
    return exc


def api_client(kubeconfig: str | None) -> k8s.ApiClient:
    """A client from ``kubeconfig``, else the in-cluster ServiceAccount, else the default kubeconfig."""
    if kubeconfig:
        os.environ["KUBECONFIG"] = kubeconfig  # kopf's login (operator) reads the same file
        client: k8s.ApiClient = k8s_config.new_client_from_config(config_file=kubeconfig)  # type: ignore[no-untyped-call]
        return client
    try:
        k8s_config.load_incluster_config()  # type: ignore[no-untyped-call]
    except k8s_config.ConfigException:
        k8s_config.load_kube_config()  # type: ignore[no-untyped-call]
    return k8s.ApiClient()


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class Kube:
    """The calls both components make; ``osinstance_namespace`` is where OSInstances live."""

    def __init__(self, api: k8s.ApiClient, osinstance_namespace: str = names.DEFAULT_OSINSTANCE_NAMESPACE) -> None:
        self.api = api
        self.core = k8s.CoreV1Api(api)
        self.custom = k8s.CustomObjectsApi(api)
        self.policy = k8s.PolicyV1Api(api)
        self.namespace = osinstance_namespace

    # --- reads ---------------------------------------------------------------------------------------------

    def list_nodes(self) -> list[NodeView]:
        data = _json(self.core.list_node(_preload_content=False))
        return [NodeView.from_dict(item) for item in data.get("items") or []]

    def get_node(self, name: str) -> dict[str, Any]:
        try:
            return _json(self.core.read_node(name, _preload_content=False))
        except ApiException as exc:
            raise _translate(exc) from exc

    def list_os(self) -> list[OS]:
        data = _json(
            self.custom.list_cluster_custom_object(names.GROUP, names.VERSION, names.OS_PLURAL, _preload_content=False)
        )
        return [OS.from_dict(item) for item in data.get("items") or []]

    def get_os(self, namespace: str, name: str) -> OS:
        try:
            return OS.from_dict(
                _json(
                    self.custom.get_namespaced_custom_object(
                        names.GROUP, names.VERSION, namespace, names.OS_PLURAL, name, _preload_content=False
                    )
                )
            )
        except ApiException as exc:
            raise _translate(exc) from exc

    def list_osinstances(self) -> dict[str, OSInstance]:
        data = _json(
            self.custom.list_namespaced_custom_object(
                names.GROUP, names.VERSION, self.namespace, names.OSINSTANCE_PLURAL, _preload_content=False
            )
        )
        out = {}
        for item in data.get("items") or []:
            inst = OSInstance.from_dict(item)
            out[inst.name] = inst
        return out

    def get_osinstance(self, name: str) -> OSInstance:
        try:
            return OSInstance.from_dict(
                _json(
                    self.custom.get_namespaced_custom_object(
                        names.GROUP,
                        names.VERSION,
                        self.namespace,
                        names.OSINSTANCE_PLURAL,
                        name,
                        _preload_content=False,
                    )
                )
            )
        except ApiException as exc:
            raise _translate(exc) from exc

    # --- OSInstance writes --------------------------------------------------------------------------------

    def create_osinstance(self, node: str, spec: OSInstanceSpec) -> None:
        body = {
            "apiVersion": names.API_VERSION,
            "kind": "OSInstance",
            "metadata": {
                "name": node,
                "namespace": self.namespace,
                "labels": {names.LABEL_OSINSTANCE_NODE: node},
            },
            "spec": spec.to_dict(),
        }
        try:
            self.custom.create_namespaced_custom_object(
                names.GROUP, names.VERSION, self.namespace, names.OSINSTANCE_PLURAL, body
            )
        except ApiException as exc:
            raise _translate(exc) from exc

    def patch_osinstance_spec(self, node: str, spec: dict[str, Any], resource_version: str = "") -> None:
        body: dict[str, Any] = {"spec": spec}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}
        try:
            self.custom.patch_namespaced_custom_object(
                names.GROUP,
                names.VERSION,
                self.namespace,
                names.OSINSTANCE_PLURAL,
                node,
                body,
                _content_type=MERGE,
            )
        except ApiException as exc:
            raise _translate(exc) from exc

    def patch_osinstance_status(self, node: str, status: dict[str, Any], resource_version: str = "") -> str:
        """Merge ``status``; with ``resource_version`` only if nobody wrote in between. Returns the new one."""
        body: dict[str, Any] = {"status": status}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}
        try:
            resp = self.custom.patch_namespaced_custom_object_status(
                names.GROUP,
                names.VERSION,
                self.namespace,
                names.OSINSTANCE_PLURAL,
                node,
                body,
                _content_type=MERGE,
                _preload_content=False,
            )
        except ApiException as exc:
            raise _translate(exc) from exc
        return str(_json(resp).get("metadata", {}).get("resourceVersion", ""))

    def delete_osinstance(self, node: str) -> bool:
        try:
            self.custom.delete_namespaced_custom_object(
                names.GROUP, names.VERSION, self.namespace, names.OSINSTANCE_PLURAL, node
            )
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True

    # --- OS writes ----------------------------------------------------------------------------------------

    def patch_os_status(self, os: OS, status: dict[str, Any]) -> None:
        """Write the status computed from ``os`` as read; Conflict when it changed since."""
        body = {"metadata": {"resourceVersion": os.resource_version}, "status": status}
        try:
            self.custom.patch_namespaced_custom_object_status(
                names.GROUP, names.VERSION, os.namespace, names.OS_PLURAL, os.name, body, _content_type=MERGE
            )
        except ApiException as exc:
            raise _translate(exc) from exc

    # --- Nodes --------------------------------------------------------------------------------------------

    def patch_node_labels(
        self, node: str, add: Mapping[str, str] | None = None, remove: tuple[str, ...] | list[str] = ()
    ) -> None:
        labels: dict[str, str | None] = dict(add or {})
        for key in remove:
            labels[key] = None
        if not labels:
            return
        try:
            self.core.patch_node(node, {"metadata": {"labels": labels}}, _content_type=MERGE)
        except ApiException as exc:
            raise _translate(exc) from exc

    def set_unschedulable(self, node: str, value: bool) -> None:
        try:
            self.core.patch_node(node, {"spec": {"unschedulable": value or None}}, _content_type=MERGE)
        except ApiException as exc:
            raise _translate(exc) from exc

    # --- Events -------------------------------------------------------------------------------------------

    def record_event(
        self,
        *,
        kind: str,
        name: str,
        namespace: str,
        uid: str,
        type_: str,
        reason: str,
        message: str,
        component: str,
        host: str = "",
        api_version: str = "v1",
    ) -> None:
        """A core/v1 Event about an object (``namespace`` empty for Nodes: the Event goes to ``default``)."""
        stamp = now_iso()
        event_ns = namespace or "default"
        body: Any = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{name}.{uuid.uuid4().hex[:16]}", "namespace": event_ns},
            "involvedObject": {
                "apiVersion": api_version,
                "kind": kind,
                "name": name,
                **({"namespace": namespace} if namespace else {}),
                **({"uid": uid} if uid else {}),
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": component, **({"host": host} if host else {})},
            "reportingComponent": component,
            "reportingInstance": host or component,
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
        }
        try:
            self.core.create_namespaced_event(event_ns, body)
        except ApiException as exc:
            # An Event that cannot be written must not stop the work it describes.
            log.warning("cannot record event %s on %s %s: %s", reason, kind, name, exc.reason)
