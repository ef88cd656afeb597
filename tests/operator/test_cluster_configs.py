"""Node configuration and health checks through the whole chain on the real API server: OS object → operator →
OSInstance → proxy → agent → ``kubeos.os.sysconfig`` on each node's own tree (its agent's ``configure_root``).

Each simulated node has its own files (simnodes.NODE_FILES under ``<node>/tree``); what the tests assert of a
node's files is read from there, what they assert of the cluster from the OS and OSInstance status and the
Node Events.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from cluster.apiserver import Cluster
from opsupport import cond, instance_status, node_events, os_manifest, os_status, osinstance
from simnodes import (
    NODE_FILES,
    V1,
    V2,
    SimCluster,
    sim_fixture,  # noqa: F401  (the fixture "sim")
    wait_for,
)

from kubeos_operator import names

pytestmark = [pytest.mark.loop, pytest.mark.slow]


def tree(sim: SimCluster, node: str) -> Path:
    return sim.nodes[node].disk.root / "tree"


def agent_kinds(sim: SimCluster, node: str) -> list[str]:
    """The node agent's operations, oldest first."""
    ops = sim.nodes[node].disk.client().operations().body["operations"]
    return [op["kind"] for op in sorted(ops, key=lambda op: op["id"])]


def test_a_bad_config_fails_on_its_node_does_not_spread_and_counts_against_the_budget(
    sim: SimCluster, cluster: Cluster, images: Any
) -> None:
    """One node lacks the sysctl the config sets at runtime: the config fails there with the agent's reason,
    nothing of it is left on that node (the persistent entry before it included), the budget (1) halts the
    rollout so no other node gets it; with a larger budget the others are configured and say so."""
    ns = cluster.create_namespace("cfg")
    pool = f"pool-{ns}"
    nodes = [f"{ns}-n{i}" for i in range(3)]
    for name in nodes:
        sim.add_node(name, {names.LABEL_NODE_SELECTOR: pool})
    bad = nodes[0]  # sorted first: the first one the operator picks
    (tree(sim, bad) / "proc/sys/net/ipv4/ip_forward").unlink()
    sim.start_loops()
    sim.start_operator()
    sysconfigs = {
        "version": "net-1",
        "configs": [
            {"model": "kernel.sysctl.persist", "contents": [{"key": "vm.swappiness", "value": 10}]},
            {"model": "kernel.sysctl", "contents": [{"key": "net.ipv4.ip_forward", "value": 1}]},
        ],
    }
    manifest = os_manifest(
        "net",
        ns,
        nodeselector=pool,
        opstype="config",
        osversion=V1,
        sysconfigs=sysconfigs,
        maxunavailable=1,
        maxretries=1,
        maxfailures=1,
    )
    cluster.apply(manifest)

    wait_for(lambda: instance_status(cluster, bad).get("phase") == "failed", 120, "the bad node to fail", sim)
    failed = instance_status(cluster, bad)
    assert "net.ipv4.ip_forward" in failed["lastError"], failed
    assert failed["opstype"] == "config" and failed["attempts"] == 1
    assert (failed.get("sysconfigs") or {}).get("version", "") != "net-1"  # not recorded as applied
    assert (tree(sim, bad) / "etc/sysctl.conf").read_text() == NODE_FILES["etc/sysctl.conf"]
    assert "OperationFailed" in [e.reason for e in node_events(cluster, bad)]
    assert agent_kinds(sim, bad) == ["configure"]
    wait_for(  # the node is handed back just after its status says failed
        lambda: names.LABEL_CONFIGURING not in (cluster.core.read_node(bad).metadata.labels or {}), 30, "release", sim
    )
    assert not cluster.core.read_node(bad).spec.unschedulable

    status = wait_for(lambda: (st := os_status(cluster, ns, "net")).get("failed") == 1 and st, 30, "the count", sim)
    assert cond(status, "Failed") == ("True", "FailureBudgetExhausted")
    time.sleep(4)  # several rounds (timeinterval 1): the config does not spread
    for name in nodes[1:]:
        assert osinstance(cluster, name)["spec"]["nodestatus"] == "idle"
        assert (tree(sim, name) / "etc/sysctl.conf").read_text() == NODE_FILES["etc/sysctl.conf"]
        assert sim.nodes[name].disk.client().operations().body["operations"] == []

    cluster.apply({**manifest, "spec": {**manifest["spec"], "maxfailures": 2}})
    wait_for(
        lambda: all(instance_status(cluster, n).get("phase") == "done" for n in nodes[1:]),
        180,
        "the other nodes to be configured",
        sim,
    )
    for name in nodes[1:]:
        st = instance_status(cluster, name)
        assert st["sysconfigs"]["version"] == "net-1"
        assert "vm.swappiness = 10" in (tree(sim, name) / "etc/sysctl.conf").read_text()
        assert (tree(sim, name) / "proc/sys/net/ipv4/ip_forward").read_text().strip() == "1"
        assert sim.nodes[name].boots == []
    assert instance_status(cluster, bad)["phase"] == "failed"
    counts = ("matching", "updated", "failed")
    wait_for(
        lambda: tuple(os_status(cluster, ns, "net").get(k) for k in counts) == (3, 2, 1), 30, "the final counts", sim
    )
    assert sim.max_busy <= 1


def test_an_upgrade_applies_upgradeconfigs_before_and_sysconfigs_after_the_reboot(
    sim: SimCluster, cluster: Cluster, images: Any
) -> None:
    ns = cluster.create_namespace("upcfg")
    node = f"{ns}-n0"
    sim.add_node(node, {names.LABEL_NODE_SELECTOR: f"pool-{ns}"})
    sim.start_loops()
    sim.start_operator()
    upgradeconfigs = {
        "version": "pre-1",
        "configs": [{"model": "kernel.sysctl.persist", "contents": [{"key": "vm.swappiness", "value": 20}]}],
    }
    sysconfigs = {
        "version": "post-1",
        "configs": [{"model": "pam.limits", "contents": [{"key": "*", "value": "soft.nofile.65535"}]}],
    }
    cluster.apply(
        os_manifest(
            "up",
            ns,
            nodeselector=f"pool-{ns}",
            imageurl=f"file://{images.v2}",
            checksum=images.v2_sha256,
            upgradeconfigs=upgradeconfigs,
            sysconfigs=sysconfigs,
        )
    )
    wait_for(lambda: instance_status(cluster, node).get("phase") == "done", 300, "the upgrade", sim)
    status = instance_status(cluster, node)
    assert status["upgradeconfigs"]["version"] == "pre-1"
    assert status["sysconfigs"]["version"] == "post-1"
    assert cluster.core.read_node(node).status.node_info.os_image == V2
    assert sim.nodes[node].boots == ["B"]
    assert "vm.swappiness = 20" in (tree(sim, node) / "etc/sysctl.conf").read_text()
    assert "65535" in (tree(sim, node) / "etc/security/limits.conf").read_text()
    # upgradeconfigs before the new slot is written, sysconfigs once the new slot runs and is committed.
    assert agent_kinds(sim, node) == ["configure", "prepare_upgrade", "upgrade", "verify_upgrade", "configure"]


def test_failing_health_checks_of_the_os_object_bring_the_node_back_on_its_old_slot(
    sim: SimCluster, cluster: Cluster, images: Any
) -> None:
    """The OS object's healthchecks travel to the agent with the upgrade; after the reboot they fail, the agent
    rolls the node back by itself, and the proxy records that as the attempt's failure."""
    ns = cluster.create_namespace("health")
    node = f"{ns}-n0"
    sim.add_node(node, {names.LABEL_NODE_SELECTOR: f"pool-{ns}"})
    sim.start_loops()
    sim.start_operator()
    marker = tree(sim, node) / "workload-ready"
    healthchecks = {"deadline": 3, "commands": [{"argv": ["test", "-e", str(marker)], "name": "workload ready"}]}
    cluster.apply(
        os_manifest(
            "guarded",
            ns,
            nodeselector=f"pool-{ns}",
            imageurl=f"file://{images.v2}",
            checksum=images.v2_sha256,
            maxretries=1,
            healthchecks=healthchecks,
        )
    )
    wait_for(lambda: instance_status(cluster, node).get("phase") == "failed", 300, "the node to fail", sim)
    status = instance_status(cluster, node)
    assert "rolled-back" in status["lastError"] and "workload ready" in status["lastError"], status
    assert sim.nodes[node].boots == ["B", "A"]  # the trial, then back on the committed slot
    agent = sim.nodes[node].disk.client().status().body
    assert agent["disk"]["running_slot"] == "A" and agent["last_upgrade"]["outcome"] == "rolled-back"
    assert cluster.core.read_node(node).status.node_info.os_image == V1
    assert not cluster.core.read_node(node).spec.unschedulable
    wait_for(lambda: cond(os_status(cluster, ns, "guarded"), "Failed")[0] == "True", 30, "the OS to say Failed", sim)
