"""deploy/ on a real kube-apiserver: every manifest applies server-side, KubeOS manifests are accepted
unchanged with KubeOS's defaults, and RBAC gives each component exactly what it needs."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from cluster.apiserver import Cluster
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException
from opsupport import DEPLOY, MANIFESTS, kustomize

from kubeos_operator import names


def test_every_deploy_manifest_applies_server_side(deployed: Cluster) -> None:
    for path in (DEPLOY / "kustomize" / "base", DEPLOY / "kustomize" / "overlays" / "debug"):
        docs = kustomize(path)
        kinds = sorted({d["kind"] for d in docs})
        assert {"CustomResourceDefinition", "DaemonSet", "Deployment", "ClusterRole", "Role"} <= set(kinds)
        results = deployed.apply(docs, field_manager="kubeos-deploy")
        assert len(results) == len(docs)
    ext = k8s.ApiextensionsV1Api(deployed.api)
    for name in ("os.upgrade.openeuler.org", "osinstances.upgrade.openeuler.org"):
        crd = ext.read_custom_resource_definition(name)
        assert crd.status is not None
        established = [c for c in crd.status.conditions or [] if c.type == "Established"]
        assert established and established[0].status == "True"
    apps = k8s.AppsV1Api(deployed.api)
    ds = apps.read_namespaced_daemon_set("kubeos-proxy", "kubeos-system")
    assert ds.spec is not None and ds.spec.template.spec is not None
    volumes = ds.spec.template.spec.volumes or []
    assert [v.host_path.path for v in volumes if v.host_path] == ["/run/kubeos"]


def _custom(cluster: Cluster) -> k8s.CustomObjectsApi:
    return k8s.CustomObjectsApi(cluster.api)


@pytest.mark.parametrize("manifest", sorted(p.name for p in MANIFESTS.glob("kubeos-*.yaml")))
def test_kubeos_manifests_are_accepted_unchanged(deployed: Cluster, manifest: str) -> None:
    doc = yaml.safe_load((MANIFESTS / manifest).read_text())
    ns = deployed.create_namespace("kubeos-manifest")
    doc["metadata"]["namespace"] = ns
    deployed.apply(doc)
    stored: dict[str, Any] = _custom(deployed).get_namespaced_custom_object(
        names.GROUP, names.VERSION, ns, names.OS_PLURAL, doc["metadata"]["name"]
    )
    spec = stored["spec"]
    for key, value in doc["spec"].items():
        assert spec[key] == value, key  # nothing pruned, nothing changed
    # KubeOS's defaults where the manifest left the field out.
    assert spec["nodeselector"] == doc["spec"].get("nodeselector", "no-label")
    assert spec["timeinterval"] == doc["spec"].get("timeinterval", 15)
    assert spec["executionmode"] == doc["spec"].get("executionmode", "parallel")


def test_a_manifest_without_a_kubeos_required_field_is_refused(deployed: Cluster) -> None:
    doc = yaml.safe_load((MANIFESTS / "kubeos-upgrade.yaml").read_text())
    ns = deployed.create_namespace("kubeos-manifest")
    doc["metadata"]["namespace"] = ns
    del doc["spec"]["maxunavailable"]
    with pytest.raises(ApiException) as err:
        _custom(deployed).create_namespaced_custom_object(names.GROUP, names.VERSION, ns, names.OS_PLURAL, doc)
    assert err.value.status == 422 and "maxunavailable" in str(err.value.body)
    doc = yaml.safe_load((MANIFESTS / "kubeos-upgrade.yaml").read_text())
    doc["metadata"]["namespace"] = ns
    doc["spec"]["opstype"] = "reinstall"
    with pytest.raises(ApiException) as err:
        _custom(deployed).create_namespaced_custom_object(names.GROUP, names.VERSION, ns, names.OS_PLURAL, doc)
    assert err.value.status == 422 and "opstype" in str(err.value.body)


def _can(api: k8s.ApiClient, verb: str, resource: str, *, group: str = "", namespace: str = "", sub: str = "") -> bool:
    review = k8s.V1SelfSubjectAccessReview(
        spec=k8s.V1SelfSubjectAccessReviewSpec(
            resource_attributes=k8s.V1ResourceAttributes(
                verb=verb, resource=resource, group=group, namespace=namespace or None, subresource=sub or None
            )
        )
    )
    answer = k8s.AuthorizationV1Api(api).create_self_subject_access_review(review)
    return bool(answer.status and answer.status.allowed)


def test_rbac_is_least_privilege(deployed: Cluster) -> None:
    operator = deployed.client_for_service_account("kubeos-system", "kubeos-operator")
    proxy = deployed.client_for_service_account("kubeos-system", "kubeos-proxy")
    g = names.GROUP
    # The operator schedules: OS status, OSInstance specs, Node labels, its Lease. No pods, no evictions.
    assert _can(operator, "patch", "os", group=g, namespace="any", sub="status")
    assert _can(operator, "create", "osinstances", group=g, namespace="default")
    assert _can(operator, "delete", "osinstances", group=g, namespace="default")
    assert _can(operator, "patch", "nodes")
    assert _can(operator, "create", "leases", group="coordination.k8s.io", namespace="kubeos-system")
    assert not _can(operator, "create", "pods", namespace="default", sub="eviction")
    assert not _can(operator, "list", "pods")
    assert not _can(operator, "patch", "os", group=g, namespace="any")
    assert not _can(operator, "create", "osinstances", group=g, namespace="other")
    assert not _can(operator, "patch", "osinstances", group=g, namespace="other")
    assert _can(operator, "watch", "osinstances", group=g)  # read-only, cluster-wide: kopf's watch
    # The proxy drains and reports. It cannot delete pods directly, change OS objects or delete nodes.
    assert _can(proxy, "create", "pods", namespace="app", sub="eviction")
    assert _can(proxy, "list", "pods")
    assert _can(proxy, "patch", "nodes")
    assert _can(proxy, "patch", "osinstances", group=g, namespace="default", sub="status")
    assert _can(proxy, "get", "os", group=g, namespace="any")
    assert not _can(proxy, "delete", "pods", namespace="app")
    assert not _can(proxy, "patch", "os", group=g, namespace="any")
    assert not _can(proxy, "patch", "os", group=g, namespace="any", sub="status")
    assert not _can(proxy, "delete", "nodes")
    assert not _can(proxy, "delete", "osinstances", group=g, namespace="default")
    assert not _can(proxy, "create", "leases", group="coordination.k8s.io", namespace="kubeos-system")
