"""The operator alone on the real API server (no proxies: nodes stay busy once assigned, which is exactly
what the limit must survive): assignments, labels, OSInstances, status, Events, restarts, cleanup."""

from __future__ import annotations

import datetime
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cluster.apiserver import Cluster
from kubernetes import client as k8s
from opsupport import cond, os_manifest, os_status
from simnodes import V1, V2, SimCluster, sim_cluster, wait_for

from kubeos_operator import names

SHA = "a" * 64


@pytest.fixture
def sim(deployed: Cluster, cluster: Cluster, tmp_path: Path) -> Iterator[SimCluster]:
    with sim_cluster(cluster, Path("/nonexistent"), tmp_path) as s:
        yield s


def kubeos_os(name: str, namespace: str, selector: str, **spec: Any) -> dict[str, Any]:
    return os_manifest(name, namespace, nodeselector=selector, **spec)


def labelled(cluster: Cluster, prefix: str, label: str = names.LABEL_UPGRADING) -> list[str]:
    return sorted(
        n.metadata.name
        for n in cluster.core.list_node().items
        if n.metadata.name.startswith(prefix) and label in (n.metadata.labels or {})
    )


def make_nodes(cluster: Cluster, prefix: str, count: int, selector: str, **labels: str) -> list[str]:
    made = []
    for i in range(count):
        name = f"{prefix}-n{i}"
        cluster.create_node(name, {names.LABEL_NODE_SELECTOR: selector, **labels}, os_image=V1)
        made.append(name)
    return made


def test_assigns_up_to_the_limit_and_survives_a_kill(sim: SimCluster, cluster: Cluster) -> None:
    ns = cluster.create_namespace("op")
    make_nodes(cluster, ns, 6, ns)
    sim.start_loops()
    sim.start_operator()
    cluster.apply(kubeos_os("fleet", ns, ns, maxunavailable=2))
    wait_for(lambda: len(labelled(cluster, ns)) == 2, 60, "two nodes assigned", sim)
    assert labelled(cluster, ns) == [f"{ns}-n0", f"{ns}-n1"]
    inst = k8s.CustomObjectsApi(cluster.api).get_namespaced_custom_object(
        names.GROUP, names.VERSION, "default", names.OSINSTANCE_PLURAL, f"{ns}-n0"
    )
    assert inst["spec"]["nodestatus"] == "upgrade"
    assert inst["spec"]["namespacedname"] == {"name": "fleet", "namespace": ns}
    assert inst["metadata"]["labels"][names.LABEL_OSINSTANCE_NODE] == f"{ns}-n0"
    status = wait_for(lambda: (s := os_status(cluster, ns, "fleet")).get("inProgress") == 2 and s, 30, "status", sim)
    assert (status["matching"], status["updated"], status["failed"]) == (6, 0, 0)
    assert cond(status, "Progressing") == ("True", "NodesInProgress")
    events = {e.reason for e in cluster.core.list_namespaced_event(ns).items}
    assert "NodeAssigned" in events
    # kopf only watches: no finalizer on the OS object (deleting it never hangs on the operator), no
    # bookkeeping annotations on the Nodes.
    obj = k8s.CustomObjectsApi(cluster.api).get_namespaced_custom_object(
        names.GROUP, names.VERSION, ns, names.OS_PLURAL, "fleet"
    )
    assert not obj["metadata"].get("finalizers")
    node_annotations = cluster.core.read_node(f"{ns}-n0").metadata.annotations or {}
    assert not [k for k in node_annotations if "kopf" in k]
    node_events = [
        e for e in cluster.core.list_namespaced_event("default").items if e.involved_object.name == f"{ns}-n0"
    ]
    assert any(e.reason == "OSOperationAssigned" for e in node_events)
    # With the Node's uid, as kubectl describe node searches them.
    uid = cluster.core.read_node(f"{ns}-n0").metadata.uid
    assert all(e.involved_object.uid == uid and e.involved_object.kind == "Node" for e in node_events)
    # kill -9 and a new operator: it counts the busy nodes from the cluster and assigns nothing more.
    sim.kill_operator()
    # Half-assigned by a crash: OSInstance written, label missing. Still counts as busy.
    cluster.core.patch_node(f"{ns}-n1", {"metadata": {"labels": {names.LABEL_UPGRADING: None}}})
    sim.start_operator("--lease-duration", "3")
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline:
        assert len(labelled(cluster, ns)) <= 2
        time.sleep(0.2)
    assert sim.max_busy <= 2
    # The metrics endpoint of the new instance.
    wait_for(lambda: f'kubeos_os_nodes{{os="{ns}/fleet",state="in_progress"}} 2.0' in sim.metrics(), 30, "metrics", sim)


def test_duplicate_selector_pause_and_time_window_stop_new_assignments(sim: SimCluster, cluster: Cluster) -> None:
    ns = cluster.create_namespace("op")
    make_nodes(cluster, ns, 2, ns)
    now = datetime.datetime.now()
    closed = {
        "starttime": (now + datetime.timedelta(hours=2)).strftime("%H:%M:%S"),
        "endtime": (now + datetime.timedelta(hours=3)).strftime("%H:%M:%S"),
    }
    sim.start_operator()
    cluster.apply(kubeos_os("windowed", ns, ns, timewindow=closed))
    wait_for(
        lambda: cond(os_status(cluster, ns, "windowed"), "Progressing") == ("False", "TimeWindowClosed"),
        30,
        "window closed",
        sim,
    )
    assert labelled(cluster, ns) == []
    # A second OS with the same selector: both are refused.
    cluster.apply(kubeos_os("twin", ns, ns))
    wait_for(
        lambda: cond(os_status(cluster, ns, "twin"), "Failed") == ("True", "DuplicateSelector"),
        30,
        "duplicate reported",
        sim,
    )
    k8s.CustomObjectsApi(cluster.api).delete_namespaced_custom_object(
        names.GROUP, names.VERSION, ns, names.OS_PLURAL, "twin"
    )
    # Paused, window open: still nothing; resumed: nodes start.
    cluster.apply(kubeos_os("windowed", ns, ns, timewindow={"starttime": "", "endtime": ""}, paused=True))
    wait_for(lambda: cond(os_status(cluster, ns, "windowed"), "Paused") == ("True", "PausedBySpec"), 30, "paused", sim)
    time.sleep(2)
    assert labelled(cluster, ns) == []
    cluster.apply(kubeos_os("windowed", ns, ns, timewindow={"starttime": "", "endtime": ""}, paused=False))
    wait_for(lambda: len(labelled(cluster, ns)) == 2, 30, "nodes assigned after resume", sim)


def test_control_plane_nodes_skipped_unless_allowed(sim: SimCluster, cluster: Cluster) -> None:
    ns = cluster.create_namespace("op")
    make_nodes(cluster, ns, 1, ns)
    cluster.create_node(f"{ns}-cp", {names.LABEL_NODE_SELECTOR: ns, names.LABEL_CONTROL_PLANE: ""}, os_image=V1)
    sim.start_operator()
    cluster.apply(kubeos_os("fleet", ns, ns, maxunavailable=5))
    wait_for(lambda: labelled(cluster, ns) == [f"{ns}-n0"], 30, "worker assigned", sim)
    time.sleep(2)
    assert labelled(cluster, ns) == [f"{ns}-n0"]
    assert os_status(cluster, ns, "fleet")["matching"] == 1
    # Nothing changes any more: rounds go on (timeinterval 1) but write nothing.
    api = k8s.CustomObjectsApi(cluster.api)
    before = api.get_namespaced_custom_object(names.GROUP, names.VERSION, ns, names.OS_PLURAL, "fleet")
    time.sleep(3)
    after = api.get_namespaced_custom_object(names.GROUP, names.VERSION, ns, names.OS_PLURAL, "fleet")
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]


def test_serial_mode_batches_and_config_copying(sim: SimCluster, cluster: Cluster) -> None:
    ns = cluster.create_namespace("op")
    make_nodes(cluster, ns, 4, ns)
    sysconfigs = {
        "version": "s1",
        "configs": [{"model": "grub.cmdline.current", "contents": [{"key": "panic", "value": "5"}]}],
    }
    sim.start_operator()
    cluster.apply(kubeos_os("serial", ns, ns, executionmode="serial", maxunavailable=3, sysconfigs=sysconfigs))
    wait_for(
        lambda: labelled(cluster, ns, names.LABEL_SERIAL) == [f"{ns}-n0", f"{ns}-n1", f"{ns}-n2"], 30, "batch", sim
    )
    wait_for(lambda: labelled(cluster, ns) == [f"{ns}-n0"], 30, "one at a time", sim)
    inst = k8s.CustomObjectsApi(cluster.api).get_namespaced_custom_object(
        names.GROUP, names.VERSION, "default", names.OSINSTANCE_PLURAL, f"{ns}-n0"
    )
    # An upgrade's sysconfigs run after the slot flip: current and next swap.
    assert inst["spec"]["sysconfigs"]["configs"][0]["model"] == "grub.cmdline.next"


def test_a_deleted_node_takes_its_osinstance_along(sim: SimCluster, cluster: Cluster) -> None:
    ns = cluster.create_namespace("op")
    (name,) = make_nodes(cluster, ns, 1, ns)
    sim.start_operator()
    cluster.apply(kubeos_os("fleet", ns, ns))
    api = k8s.CustomObjectsApi(cluster.api)

    def instance_exists() -> bool:
        try:
            api.get_namespaced_custom_object(names.GROUP, names.VERSION, "default", names.OSINSTANCE_PLURAL, name)
            return True
        except k8s.ApiException as exc:
            if exc.status == 404:
                return False
            raise

    wait_for(instance_exists, 30, "OSInstance created", sim)
    cluster.delete_node(name)
    wait_for(lambda: not instance_exists(), 30, "OSInstance deleted with its Node", sim)


def test_lease_has_one_holder_and_is_taken_over_only_after_it_expires(deployed: Cluster) -> None:
    from kubeos_operator.leader import LeaderElection

    ns = deployed.create_namespace("lease")
    a = LeaderElection(deployed.api, ns, "kubeos-operator", "a", duration=2)
    b = LeaderElection(deployed.api, ns, "kubeos-operator", "b", duration=2)
    assert a.try_acquire_or_renew() and a.is_leader
    assert not b.try_acquire_or_renew() and not b.is_leader
    assert a.try_acquire_or_renew()  # renewal
    time.sleep(2.5)  # a stops renewing: it must not believe it leads any more, and b may take over
    assert not a.is_leader
    assert b.try_acquire_or_renew() and b.is_leader
    assert not a.try_acquire_or_renew()
    lease = k8s.CoordinationV1Api(deployed.api).read_namespaced_lease("kubeos-operator", ns)
    assert lease.spec.holder_identity == "b" and lease.spec.lease_transitions == 1
    b.release()
    assert a.try_acquire_or_renew()  # released: no need to wait for expiry


def test_metrics_health_and_readiness_endpoints(sim: SimCluster, cluster: Cluster) -> None:
    import urllib.error
    import urllib.request

    sim.start_operator()
    base = f"http://127.0.0.1:{sim.operator_port}"

    def get(path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(base + path, timeout=5) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, ""
        except OSError:
            return 0, ""

    wait_for(lambda: get("/readyz")[0] == 200, 30, "readiness", sim)
    assert get("/healthz")[0] == 200
    status, text = get("/metrics")
    assert status == 200 and "kubeos_operator_leader 1.0" in text
    assert get("/nothing")[0] == 404


def test_a_time_window_that_opens_lets_nodes_start(sim: SimCluster, cluster: Cluster) -> None:
    ns = cluster.create_namespace("op")
    make_nodes(cluster, ns, 1, ns)
    sim.start_operator()
    sim.wait_operator_ready()
    now = datetime.datetime.now()
    if (now + datetime.timedelta(seconds=10)).date() != now.date():
        pytest.skip("too close to midnight for a daily window starting in a few seconds")
    opens = (now + datetime.timedelta(seconds=6)).replace(microsecond=0)  # the window has whole seconds
    window = {
        "starttime": opens.strftime("%H:%M:%S"),
        "endtime": (now + datetime.timedelta(hours=1)).strftime("%H:%M:%S") if now.hour < 23 else "23:59:59",
    }
    cluster.apply(kubeos_os("later", ns, ns, timewindow=window))
    wait_for(
        lambda: cond(os_status(cluster, ns, "later"), "Progressing") == ("False", "TimeWindowClosed"),
        30,
        "the window to be reported closed",
        sim,
    )
    assert labelled(cluster, ns) == []
    wait_for(lambda: labelled(cluster, ns) == [f"{ns}-n0"], 60, "the node to start once the window opens", sim)
    assert datetime.datetime.now() >= opens
    reasons = [e.reason for e in cluster.core.list_namespaced_event(ns).items]
    assert "TimeWindowClosed" in reasons and "NodeAssigned" in reasons


def _metric(text: str, name: str, os_key: str) -> float:
    prefix = f'{name}{{os="{os_key}"}} '
    return sum(float(line[len(prefix) :]) for line in text.splitlines() if line.startswith(prefix))


def test_a_settled_rollout_reads_nothing_until_a_node_changes(sim: SimCluster, cluster: Cluster) -> None:
    """Every node at the target: the OS object settles and its rounds are skipped (no API reads while idle);
    a new Node that needs the upgrade is seen through the watch and gets it without waiting for a resync."""
    ns = cluster.create_namespace("op")
    for i in range(2):
        cluster.create_node(f"{ns}-n{i}", {names.LABEL_NODE_SELECTOR: ns}, os_image=V2)
    sim.start_operator()
    sim.wait_operator_ready()
    cluster.apply(kubeos_os("idle", ns, ns))
    key = f"{ns}/idle"
    wait_for(lambda: cond(os_status(cluster, ns, "idle"), "Complete")[0] == "True", 30, "Complete", sim)
    wait_for(lambda: _metric(sim.metrics(), "kubeos_scheduling_rounds_skipped_total", key) >= 2, 30, "skips", sim)
    rounds = _metric(sim.metrics(), "kubeos_scheduling_rounds_total", key)
    time.sleep(4)  # timeinterval is 1 s: four rounds would have run
    text = sim.metrics()
    assert _metric(text, "kubeos_scheduling_rounds_total", key) == rounds
    assert _metric(text, "kubeos_scheduling_rounds_skipped_total", key) >= 5

    cluster.create_node(f"{ns}-n2", {names.LABEL_NODE_SELECTOR: ns}, os_image=V1)
    wait_for(lambda: labelled(cluster, ns) == [f"{ns}-n2"], 20, "the new node to be assigned", sim)
    # The round is counted once it ended (after its writes): the label can be seen a moment earlier.
    wait_for(lambda: _metric(sim.metrics(), "kubeos_scheduling_rounds_total", key) > rounds, 10, "a counted round", sim)
