"""Rollouts on the real API server: real operator, real proxies, real agents on loop-backed disks.

Needs root (loop devices) and the test cluster (tests/cluster). Each node's "reboot" is played by the
harness (simnodes.py). A sampler lists the Nodes every 0.1 s during the whole rollout.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from cluster.apiserver import Cluster
from opsupport import cond, instance_status, node_events, os_manifest, os_status, osinstance
from simnodes import (
    V1,
    V2,
    SimCluster,
    sim_fixture,  # noqa: F401  (the fixture "sim")
    wait_for,
)

from kubeos_operator import names

pytestmark = [pytest.mark.loop, pytest.mark.slow]


def upgrade_os(name: str, namespace: str, images: Any, **spec: Any) -> dict[str, Any]:
    """A KubeOS-style OS object that upgrades to the test image (served as a file)."""
    return os_manifest(name, namespace, **{"imageurl": f"file://{images.v2}", "checksum": images.v2_sha256, **spec})


def condition(status: dict[str, Any], kind: str) -> str:
    return cond(status, kind)[0]


def bind_workload(cluster: Cluster, namespace: str, node: str, app: str = "web") -> None:
    cluster.bind_pod(
        {
            "metadata": {
                "name": f"{app}-{node}",
                "namespace": namespace,
                "labels": {"app": app},
                "ownerReferences": [
                    {
                        "apiVersion": "apps/v1",
                        "kind": "ReplicaSet",
                        "name": "web",
                        "uid": "0a0b0c0d-0000-4000-8000-000000000001",
                        "controller": True,
                    }
                ],
            }
        },
        node,
    )


def test_rollout_never_exceeds_maxunavailable_and_ends_true(sim: SimCluster, cluster: Cluster, images: Any) -> None:
    ns = cluster.create_namespace("rollout")
    pool = {names.LABEL_NODE_SELECTOR: f"pool-{ns}"}
    count, limit = 10, 3
    for i in range(count):
        sim.add_node(f"{ns}-n{i}", pool)
        bind_workload(cluster, ns, f"{ns}-n{i}")
    sim.start_loops()
    sim.start_operator()
    with cluster.kubelet_loop():
        cluster.apply(upgrade_os("fleet", ns, images, maxunavailable=limit, nodeselector=f"pool-{ns}"))
        wait_for(
            lambda: condition(os_status(cluster, ns, "fleet"), "Complete") == "True",
            600,
            "the rollout to complete",
            sim,
        )
    assert sim.max_busy <= limit, f"{sim.max_busy} nodes busy at once (maxunavailable {limit})"
    assert sim.max_cordoned <= limit
    assert sim.max_busy == limit  # the limit was used, not just respected
    status = os_status(cluster, ns, "fleet")
    assert (status["matching"], status["updated"], status["inProgress"], status["failed"]) == (count, count, 0, 0)
    for name, node in sim.nodes.items():
        inst = osinstance(cluster, name)
        assert inst["spec"]["nodestatus"] == "idle"
        assert inst["status"]["phase"] == "done", inst["status"]
        assert inst["status"]["bootedVersion"] == V2 and inst["status"]["bootedSlot"] == "B"
        assert node.boots == ["B"]
        api_node = cluster.core.read_node(name)
        assert api_node.status.node_info.os_image == V2
        assert not api_node.spec.unschedulable
        assert names.LABEL_UPGRADING not in (api_node.metadata.labels or {})
    # The workload pods were evicted through the Eviction API (the harness finished their deletion).
    assert cluster.core.list_namespaced_pod(ns).items == []
    events = cluster.core.list_namespaced_event(ns).items
    assert sum(1 for e in events if e.reason == "NodeAssigned") == count
    metrics = sim.metrics()
    assert f'kubeos_os_nodes{{os="{ns}/fleet",state="updated"}} {float(count)}' in metrics


def test_a_pdb_that_blocks_the_drain_times_out_uncordons_and_says_why(
    sim: SimCluster, cluster: Cluster, images: Any
) -> None:
    ns = cluster.create_namespace("pdb")
    pool = f"pool-{ns}"
    name = f"{ns}-n0"
    sim.add_node(name, {names.LABEL_NODE_SELECTOR: pool})
    bind_workload(cluster, ns, name, app="db")
    cluster.apply(
        {
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": {"name": "db", "namespace": ns},
            "spec": {"minAvailable": 1, "selector": {"matchLabels": {"app": "db"}}},
        }
    )
    sim.start_loops()
    sim.start_operator()
    with cluster.kubelet_loop():
        cluster.apply(
            upgrade_os("guarded", ns, images, nodeselector=pool, maxunavailable=1, draintimeout=4, maxretries=1)
        )
        wait_for(lambda: instance_status(cluster, name).get("phase") == "failed", 300, "the node to fail", sim)
    status = instance_status(cluster, name)
    assert "drain timed out after 4s" in status["lastError"] and f"{ns}/db-{name}" in status["lastError"]
    assert "disruption budget" in status["lastError"].lower()
    node = cluster.core.read_node(name)
    assert not node.spec.unschedulable, "a failed drain must not leave the node cordoned"
    assert names.LABEL_UPGRADING not in (node.metadata.labels or {})
    assert cluster.core.read_namespaced_pod(f"db-{name}", ns).metadata.deletion_timestamp is None
    events = node_events(cluster, name)
    reasons = [e.reason for e in events]
    assert "Cordoned" in reasons and "Uncordoned" in reasons and "OperationFailed" in reasons
    assert {e.involved_object.uid for e in events} == {node.metadata.uid}
    drained = next(c for c in status["conditions"] if c["type"] == "Drained")
    assert drained["status"] == "False" and "timed out" in drained["message"]
    assert node_is_still_on(sim, name, V1)


def node_is_still_on(sim: SimCluster, name: str, version: str) -> bool:
    status = sim.nodes[name].disk.client().status().body
    return bool(status["disk"]["running_slot"] == "A" and status["disk"]["slots"]["A"]["pretty_name"] == version)


def test_failing_nodes_are_retried_then_failed_and_the_budget_halts_the_rollout(
    sim: SimCluster, cluster: Cluster, images: Any
) -> None:
    ns = cluster.create_namespace("budget")
    pool = f"pool-{ns}"
    for i in range(3):
        sim.add_node(f"{ns}-n{i}", {names.LABEL_NODE_SELECTOR: pool})
    sim.start_loops()
    sim.start_operator()
    bad = upgrade_os(
        "fleet", ns, images, nodeselector=pool, maxunavailable=1, maxretries=2, maxfailures=1, checksum="0" * 64
    )
    cluster.apply(bad)
    first = f"{ns}-n0"
    wait_for(lambda: instance_status(cluster, first).get("phase") == "failed", 300, "the first node to fail", sim)
    status = instance_status(cluster, first)
    assert status["attempts"] == 2 and "sha256" in status["lastError"], status
    reasons = [e.reason for e in node_events(cluster, first)]
    assert reasons.count("AttemptFailed") == 1 and "OperationFailed" in reasons
    os_st = wait_for(
        lambda: (st := os_status(cluster, ns, "fleet")).get("failed") == 1 and st, 30, "the OS to count it", sim
    )
    halted = next(c for c in os_st["conditions"] if c["type"] == "Failed")
    assert (halted["status"], halted["reason"]) == ("True", "FailureBudgetExhausted")
    time.sleep(4)  # several rounds (timeinterval 1): no other node starts
    for i in (1, 2):
        assert osinstance(cluster, f"{ns}-n{i}")["spec"]["nodestatus"] == "idle"
    # Fixed image and a larger budget: the rollout resumes on the others; the failed node stays failed.
    cluster.apply({**bad, "spec": {**bad["spec"], "checksum": images.v2_sha256, "maxfailures": 2}})
    wait_for(
        lambda: all(instance_status(cluster, f"{ns}-n{i}").get("phase") == "done" for i in (1, 2)),
        400,
        "the other nodes to upgrade",
        sim,
    )
    assert instance_status(cluster, first)["phase"] == "failed"
    assert sim.max_busy <= 1


def test_rollback_to_the_other_slot_and_refusal_on_a_fresh_node(sim: SimCluster, cluster: Cluster, images: Any) -> None:
    """A node whose other slot holds the target rolls back to it; a node whose other slot was never written
    fails at once with the reason (KubeOS would point GRUB at the empty slot)."""
    ns = cluster.create_namespace("rollback")
    pool = f"pool-{ns}"
    prepared, fresh = f"{ns}-prepared", f"{ns}-fresh"
    sim.add_node(prepared, {names.LABEL_NODE_SELECTOR: pool}, template=images.prepared)
    sim.add_node(fresh, {names.LABEL_NODE_SELECTOR: pool})
    sim.start_loops()
    sim.start_operator()
    cluster.apply(upgrade_os("back", ns, images, nodeselector=pool, opstype="rollback", maxunavailable=2))
    wait_for(lambda: instance_status(cluster, prepared).get("phase") == "done", 300, "the rollback", sim)
    wait_for(lambda: instance_status(cluster, fresh).get("phase") == "failed", 60, "the refusal", sim)
    assert sim.nodes[prepared].boots == ["B"]
    assert cluster.core.read_node(prepared).status.node_info.os_image == V2
    assert "no bootable OS" in instance_status(cluster, fresh)["lastError"]
    assert sim.nodes[fresh].boots == []
    assert node_is_still_on(sim, fresh, V1)


def test_config_operation_applies_sysconfigs_without_reboot(sim: SimCluster, cluster: Cluster, images: Any) -> None:
    ns = cluster.create_namespace("config")
    pool = f"pool-{ns}"
    names_ = [f"{ns}-n{i}" for i in range(2)]
    for name in names_:
        sim.add_node(name, {names.LABEL_NODE_SELECTOR: pool})
    sim.start_loops()
    sim.start_operator()
    sysconfigs = {
        "version": "tuned-1",
        "configs": [
            {"model": "kernel.sysctl.persist", "contents": [{"key": "vm.swappiness", "value": 10}]},
            {"model": "pam.limits", "contents": [{"key": "*", "value": "soft.nofile.65535"}]},
        ],
    }
    cluster.apply(
        upgrade_os("tune", ns, images, nodeselector=pool, opstype="config", osversion=V1, sysconfigs=sysconfigs)
    )
    wait_for(lambda: condition(os_status(cluster, ns, "tune"), "Complete") == "True", 300, "config done", sim)
    for name in names_:
        status = instance_status(cluster, name)
        assert status["phase"] == "done" and status["sysconfigs"]["version"] == "tuned-1"
        tree = sim.nodes[name].disk.root / "tree"
        assert "vm.swappiness = 10" in (tree / "etc/sysctl.conf").read_text()
        assert "65535" in (tree / "etc/security/limits.conf").read_text()
        assert sim.nodes[name].boots == []
        assert names.LABEL_CONFIGURING not in (cluster.core.read_node(name).metadata.labels or {})


def test_operator_killed_and_api_server_restarted_mid_rollout(sim: SimCluster, cluster: Cluster, images: Any) -> None:
    ns = cluster.create_namespace("restart")
    pool = f"pool-{ns}"
    count, limit = 4, 2
    for i in range(count):
        sim.add_node(f"{ns}-n{i}", {names.LABEL_NODE_SELECTOR: pool})
    sim.start_loops()
    sim.start_operator("--lease-duration", "4")
    cluster.apply(upgrade_os("fleet", ns, images, nodeselector=pool, maxunavailable=limit))
    wait_for(lambda: os_status(cluster, ns, "fleet").get("inProgress") == limit, 120, "the first batch", sim)
    sim.kill_operator()
    sim.start_operator("--lease-duration", "4")
    time.sleep(3)
    cluster.restart_apiserver(down_seconds=3)
    wait_for(
        lambda: condition(os_status(cluster, ns, "fleet"), "Complete") == "True", 600, "the rollout to complete", sim
    )
    assert sim.max_busy <= limit
    assert all(instance_status(cluster, f"{ns}-n{i}")["phase"] == "done" for i in range(count))


def test_serial_mode_upgrades_one_node_at_a_time_in_order(sim: SimCluster, cluster: Cluster, images: Any) -> None:
    ns = cluster.create_namespace("serial")
    pool = f"pool-{ns}"
    order = [f"{ns}-n{i}" for i in range(3)]
    for name in reversed(order):  # created in reverse: the order is the operator's, not creation's
        sim.add_node(name, {names.LABEL_NODE_SELECTOR: pool})
    sim.start_loops()
    sim.start_operator()
    cluster.apply(upgrade_os("serial", ns, images, nodeselector=pool, executionmode="serial", maxunavailable=2))
    wait_for(lambda: condition(os_status(cluster, ns, "serial"), "Complete") == "True", 600, "serial rollout", sim)
    assert sim.max_busy == 1
    assert sim.start_order == order
    for name in order:
        labels = cluster.core.read_node(name).metadata.labels or {}
        assert names.LABEL_SERIAL not in labels and names.LABEL_UPGRADING not in labels


def test_a_proxy_restarted_mid_operation_goes_on_without_counting_a_failure(
    sim: SimCluster, cluster: Cluster, images: Any
) -> None:
    """The proxy stops (pod deleted, DaemonSet rolled) while it follows the agent writing the new slot: the
    agent goes on, the next proxy follows the very same agent operation to the end; no attempt is lost."""
    ns = cluster.create_namespace("restartproxy")
    node = f"{ns}-n0"
    sim.add_node(node, {names.LABEL_NODE_SELECTOR: f"pool-{ns}"})
    sim.start_loops()
    sim.start_operator()
    cluster.apply(upgrade_os("fleet", ns, images, nodeselector=f"pool-{ns}", maxretries=1))
    agent = sim.nodes[node].disk.client()

    def writing() -> str:
        current = agent.status().body.get("current_operation") or {}
        return str(current.get("id", "")) if current.get("kind") == "prepare_upgrade" else ""

    prepare_id = wait_for(writing, 120, "the agent to be writing the new slot", sim)
    sim._stop_process(sim.nodes[node].proxy)
    stopped = instance_status(cluster, node)
    assert (stopped["phase"], stopped["attempts"]) == ("preparing", 0), stopped  # nothing recorded as failed
    assert cluster.core.read_node(node).spec.unschedulable is not True
    sim.start_proxy(sim.nodes[node])
    wait_for(lambda: instance_status(cluster, node).get("phase") == "done", 300, "the upgrade", sim)
    final = instance_status(cluster, node)
    assert final["attempts"] == 0 and final["lastError"] == "", final
    ops = sim.nodes[node].disk.client().operations().body["operations"]
    prepares = [op for op in ops if op["kind"] == "prepare_upgrade"]
    assert [op["id"] for op in prepares] == [prepare_id]  # followed to its end, not started again
    assert sim.nodes[node].boots == ["B"]
