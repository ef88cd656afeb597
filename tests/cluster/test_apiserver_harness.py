"""The test cluster harness is a real Kubernetes API server: versions, RBAC, nodes, evictions, PDBs, apply."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest
from kubernetes import client as k8s
from kubernetes import watch
from kubernetes.client.exceptions import ApiException

from .apiserver import Cluster, listening_addresses

T = TypeVar("T")


def eventually(check: Callable[[], T], timeout: float = 10, interval: float = 0.1) -> T:
    """Call ``check`` until it returns without raising (RBAC and watch caches settle in milliseconds)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except (AssertionError, ApiException):
            if time.monotonic() > deadline:
                raise
        time.sleep(interval)


def status_of(call: Callable[[], Any]) -> int:
    """The HTTP status an API call fails with (the test fails when it succeeds)."""
    with pytest.raises(ApiException) as info:
        call()
    return int(info.value.status)


# The client's models type every field as optional; these tests read API objects as Any and let a missing
# field fail the assertion that uses it.


def read_node(cluster: Cluster, name: str) -> Any:
    return cluster.core.read_node(name)


def read_pod(cluster: Cluster, namespace: str, name: str) -> Any:
    return cluster.core.read_namespaced_pod(name, namespace)


def read_config_map(cluster: Cluster, namespace: str, name: str) -> Any:
    return cluster.core.read_namespaced_config_map(name, namespace)


def whoami(api: k8s.ApiClient) -> Any:
    """The user the API server sees behind ``api`` (SelfSubjectReview)."""
    review: Any = k8s.AuthenticationV1Api(api).create_self_subject_review(k8s.V1SelfSubjectReview())
    return review.status.user_info


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


@pytest.fixture
def namespace(cluster: Cluster) -> str:
    return cluster.create_namespace("harness")


@pytest.fixture
def cluster_role(cluster: Cluster) -> Iterator[Callable[[list[k8s.RbacV1Subject]], str]]:
    """Grant subjects get/list on nodes through a new ClusterRole + ClusterRoleBinding (removed afterwards)."""
    made: list[str] = []

    def grant(subjects: list[k8s.RbacV1Subject]) -> str:
        name = unique("node-reader")
        made.append(name)
        cluster.rbac.create_cluster_role(
            k8s.V1ClusterRole(
                metadata=k8s.V1ObjectMeta(name=name),
                rules=[k8s.V1PolicyRule(api_groups=[""], resources=["nodes"], verbs=["get", "list"])],
            )
        )
        cluster.rbac.create_cluster_role_binding(
            k8s.V1ClusterRoleBinding(
                metadata=k8s.V1ObjectMeta(name=name),
                role_ref=k8s.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="ClusterRole", name=name),
                subjects=subjects,
            )
        )
        return name

    yield grant
    for name in made:
        cluster.rbac.delete_cluster_role_binding(name)
        cluster.rbac.delete_cluster_role(name)


def test_server_answers_version_on_loopback_only(cluster: Cluster) -> None:
    info: Any = k8s.VersionApi(cluster.api).get_code()
    assert cluster.kube_version == f"Kubernetes {info.git_version}"
    assert info.git_version.startswith("v1.") and info.platform == "linux/amd64"
    assert cluster.readyz()
    # etcd (client + peer) and kube-apiserver listen on 127.0.0.1 and nowhere else.
    for proc in (cluster.etcd, cluster.apiserver):
        addresses = listening_addresses(proc.pid)
        assert addresses, proc.name
        assert {addr for addr, _port in addresses} == {"127.0.0.1"}, (proc.name, addresses)
    assert cluster.kubeconfig.is_file()
    # The admin identity is what the kubeconfig says.
    assert "system:masters" in whoami(cluster.api).groups


def test_rbac_denies_a_fresh_service_account_until_bound(
    cluster: Cluster, namespace: str, cluster_role: Callable[[list[k8s.RbacV1Subject]], str]
) -> None:
    sa_api = cluster.client_for_service_account(namespace, "reader")
    assert whoami(sa_api).username == f"system:serviceaccount:{namespace}:reader"
    nodes = k8s.CoreV1Api(sa_api)
    assert status_of(nodes.list_node) == 403

    cluster_role([k8s.RbacV1Subject(kind="ServiceAccount", name="reader", namespace=namespace)])
    eventually(nodes.list_node)
    # Only what was granted: still no writes, and no pods.
    assert status_of(lambda: nodes.delete_node("anything")) == 403
    assert status_of(lambda: nodes.list_namespaced_pod(namespace)) == 403


def test_rbac_for_a_user_certificate_in_groups(
    cluster: Cluster, cluster_role: Callable[[list[k8s.RbacV1Subject]], str]
) -> None:
    group = unique("readers")
    alice = k8s.CoreV1Api(cluster.client_for_user("alice", [group, "other"]))
    bob = k8s.CoreV1Api(cluster.client_for_user("bob", ["other"]))
    assert status_of(alice.list_node) == 403

    cluster_role([k8s.RbacV1Subject(kind="Group", name=group, api_group="rbac.authorization.k8s.io")])
    eventually(alice.list_node)
    assert status_of(bob.list_node) == 403


def test_node_create_and_status_round_trip(cluster: Cluster) -> None:
    name = unique("node")
    cluster.create_node(name, {"upgrade.openeuler.org/pool": "a"}, os_image="KubeOS 1.0.0")
    node = read_node(cluster, name)
    assert node.metadata.labels["upgrade.openeuler.org/pool"] == "a"
    assert node.metadata.labels["kubernetes.io/hostname"] == name
    assert node.status.node_info.os_image == "KubeOS 1.0.0"
    assert not node.spec.unschedulable and not node.spec.taints
    ready = {c.type: c for c in node.status.conditions}["Ready"]
    assert ready.status == "True"
    boot = node.status.node_info.boot_id

    cluster.set_node_os_image(name, "KubeOS 2.0.0")
    node = read_node(cluster, name)
    assert node.status.node_info.os_image == "KubeOS 2.0.0"
    assert node.status.node_info.boot_id != boot
    assert node.status.node_info.kubelet_version == cluster.kube_version.split()[-1]

    cluster.set_node_ready(name, False)
    ready = {c.type: c for c in read_node(cluster, name).status.conditions}["Ready"]
    assert ready.status == "False"

    # Cordoning (spec.unschedulable) is an ordinary spec patch that the status helpers leave alone.
    cluster.core.patch_node(name, {"spec": {"unschedulable": True}}, _content_type="application/merge-patch+json")
    cluster.set_node_os_image(name, "KubeOS 2.0.1")
    node = read_node(cluster, name)
    assert node.spec.unschedulable is True
    assert node.status.node_info.os_image == "KubeOS 2.0.1"


def test_a_watch_sees_node_status_changes(cluster: Cluster) -> None:
    name = unique("node")
    created = cluster.create_node(name, os_image="KubeOS 1.0.0")
    cluster.set_node_os_image(name, "KubeOS 2.0.0")
    stream: Any = watch.Watch()  # type: ignore[no-untyped-call]
    seen: list[tuple[str, str]] = []
    for event in stream.stream(
        cluster.core.list_node,
        field_selector=f"metadata.name={name}",
        resource_version=created.metadata.resource_version,
        timeout_seconds=10,
    ):
        seen.append((event["type"], event["object"].status.node_info.os_image))
        if seen[-1] == ("MODIFIED", "KubeOS 2.0.0"):
            stream.stop()
    assert seen[-1] == ("MODIFIED", "KubeOS 2.0.0")


def test_the_node_authorizer_limits_a_kubelet_to_its_own_node(cluster: Cluster) -> None:
    mine, other = unique("node"), unique("node")
    cluster.create_node(mine)
    cluster.create_node(other)
    kubelet = k8s.CoreV1Api(cluster.client_for_user(f"system:node:{mine}", ["system:nodes"]))
    patch = {"metadata": {"labels": {"touched": "yes"}}}
    kubelet.patch_node(mine, patch, _content_type="application/merge-patch+json")
    assert status_of(lambda: kubelet.patch_node(other, patch, _content_type="application/merge-patch+json")) == 403


def _evict(cluster: Cluster, namespace: str, name: str) -> None:
    body = k8s.V1Eviction(metadata=k8s.V1ObjectMeta(name=name, namespace=namespace))
    cluster.core.create_namespaced_pod_eviction(name, namespace, body)


def _pdb_status(cluster: Cluster, namespace: str) -> Any:
    return cluster.policy.read_namespaced_pod_disruption_budget("guard", namespace).status


def test_eviction_and_pdb(cluster: Cluster, namespace: str) -> None:
    node = unique("node")
    cluster.create_node(node)

    # No PDB: the eviction is a graceful delete, and the pod goes once "the kubelet" finishes it.
    pod = cluster.bind_pod({"metadata": {"name": "free", "namespace": namespace, "labels": {"app": "free"}}}, node)
    assert pod.spec.node_name == node and pod.status.phase == "Running"
    _evict(cluster, namespace, "free")
    assert read_pod(cluster, namespace, "free").metadata.deletion_timestamp is not None
    assert f"{namespace}/free" in cluster.finish_pod_deletions()
    assert status_of(lambda: read_pod(cluster, namespace, "free")) == 404

    # A PDB with minAvailable: 1 over one healthy pod allows no disruption: 429.
    cluster.policy.create_namespaced_pod_disruption_budget(
        namespace,
        k8s.V1PodDisruptionBudget(
            metadata=k8s.V1ObjectMeta(name="guard"),
            spec=k8s.V1PodDisruptionBudgetSpec(
                min_available=1, selector=k8s.V1LabelSelector(match_labels={"app": "guarded"})
            ),
        ),
    )
    cluster.bind_pod({"metadata": {"name": "g1", "namespace": namespace, "labels": {"app": "guarded"}}}, node)
    # Before the disruption controller's first look (status not observed yet) the answer is 429 too.
    assert status_of(lambda: _evict(cluster, namespace, "g1")) == 429
    assert cluster.sync_pdbs() >= 1
    status = _pdb_status(cluster, namespace)
    assert (status.current_healthy, status.desired_healthy, status.disruptions_allowed) == (1, 1, 0)
    assert status_of(lambda: _evict(cluster, namespace, "g1")) == 429
    assert read_pod(cluster, namespace, "g1").metadata.deletion_timestamp is None

    # A second healthy pod makes one disruption allowed; the eviction spends it.
    cluster.bind_pod({"metadata": {"name": "g2", "namespace": namespace, "labels": {"app": "guarded"}}}, node)
    cluster.sync_pdbs()
    assert _pdb_status(cluster, namespace).disruptions_allowed == 1
    _evict(cluster, namespace, "g1")
    status = _pdb_status(cluster, namespace)
    assert status.disruptions_allowed == 0 and "g1" in (status.disrupted_pods or {})
    assert status_of(lambda: _evict(cluster, namespace, "g2")) == 429

    assert cluster.finish_pod_deletions() == [f"{namespace}/g1"]
    cluster.sync_pdbs()
    status = _pdb_status(cluster, namespace)
    assert (status.expected_pods, status.current_healthy, status.disruptions_allowed) == (1, 1, 0)
    assert not status.disrupted_pods


def test_kubelet_loop_finishes_evictions_in_the_background(cluster: Cluster, namespace: str) -> None:
    node = unique("node")
    cluster.create_node(node)
    cluster.bind_pod({"metadata": {"name": "p", "namespace": namespace}}, node)
    with cluster.kubelet_loop(interval=0.1):
        _evict(cluster, namespace, "p")
        eventually(lambda: assert_gone(cluster, namespace, "p"))


def assert_gone(cluster: Cluster, namespace: str, name: str) -> None:
    try:
        cluster.core.read_namespaced_pod(name, namespace)
    except ApiException as exc:
        assert exc.status == 404
    else:
        raise AssertionError(f"pod {namespace}/{name} still exists")


def test_server_side_apply_of_a_config_map(cluster: Cluster, namespace: str) -> None:
    manifest = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "settings", "namespace": namespace},
        "data": {"mode": "serial", "window": "02:00-04:00"},
    }
    (applied,) = cluster.apply(manifest, field_manager="alice")
    assert applied["data"] == manifest["data"]
    # Re-applying the same intent changes nothing.
    (again,) = cluster.apply(manifest, field_manager="alice")
    assert again["metadata"]["resourceVersion"] == applied["metadata"]["resourceVersion"]

    cm = read_config_map(cluster, namespace, "settings")
    assert [(m.manager, m.operation) for m in cm.metadata.managed_fields] == [("alice", "Apply")]

    # Another manager changing alice's field conflicts (409) unless it forces; the typed client works as well.
    change = {**manifest, "data": {"mode": "parallel"}}
    conflict = status_of(lambda: cluster.apply(change, field_manager="bob", force=False))
    assert conflict == 409
    cluster.core.patch_namespaced_config_map(
        "settings", namespace, change, field_manager="bob", force=True, _content_type="application/apply-patch+yaml"
    )
    cm = read_config_map(cluster, namespace, "settings")
    assert cm.data == {"mode": "parallel", "window": "02:00-04:00"}
    assert {m.manager for m in cm.metadata.managed_fields} == {"alice", "bob"}


def test_data_survives_an_api_server_restart(cluster: Cluster, namespace: str) -> None:
    cluster.core.create_namespaced_config_map(
        namespace, k8s.V1ConfigMap(metadata=k8s.V1ObjectMeta(name="kept"), data={"k": "v"})
    )
    pid = cluster.apiserver.pid
    cluster.restart_apiserver()
    assert cluster.apiserver.pid != pid
    assert eventually(lambda: cluster.core.read_namespaced_config_map("kept", namespace)).data == {"k": "v"}
