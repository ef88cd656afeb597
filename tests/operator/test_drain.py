"""Which pods a drain evicts, skips, or is blocked by (KubeOS's evictpodforce, kubectl drain's rules)."""

from __future__ import annotations

from typing import Any

from kubeos_operator.drain import PodView, classify


def pod(name: str, *, owner: str | None = "ReplicaSet", ns: str = "app", **extra: Any) -> PodView:
    meta: dict[str, Any] = {"name": name, "namespace": ns, "uid": f"uid-{name}"}
    if owner:
        meta["ownerReferences"] = [{"kind": owner, "name": "x", "controller": True}]
    if extra.get("mirror"):
        meta["annotations"] = {"kubernetes.io/config.mirror": "abc"}
    if extra.get("deleting"):
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    spec: dict[str, Any] = {"volumes": [{"name": "scratch", "emptyDir": {}}] if extra.get("empty_dir") else []}
    return PodView.from_dict({"metadata": meta, "spec": spec, "status": {"phase": extra.get("phase", "Running")}})


def keys(pods: list[PodView]) -> list[str]:
    return [p.name for p in pods]


def test_daemonset_mirror_and_own_pods_are_skipped() -> None:
    pods = [
        pod("ds", owner="DaemonSet"),
        pod("static", owner="Node", mirror=True),
        pod("proxy", owner=None, ns="kube-system"),
    ]
    plan = classify(pods, force=False, own_pod="kube-system/proxy")
    assert keys(plan.skip) == ["ds", "static", "proxy"] and plan.blocking == [] and plan.evict == []


def test_controller_pods_are_evicted() -> None:
    plan = classify([pod("web"), pod("db", owner="StatefulSet")], force=False)
    assert keys(plan.evict) == ["web", "db"]


def test_bare_and_emptydir_pods_block_unless_forced() -> None:
    pods = [pod("bare", owner=None), pod("cache", empty_dir=True), pod("web")]
    plan = classify(pods, force=False)
    assert [(p.name, why) for p, why in plan.blocking] == [
        ("bare", "no controller would recreate it"),
        ("cache", "its emptyDir data would be lost"),
    ]
    forced = classify(pods, force=True)
    assert keys(forced.evict) == ["bare", "cache", "web"] and forced.blocking == []


def test_finished_and_terminating_pods() -> None:
    plan = classify([pod("job", phase="Succeeded"), pod("going", deleting=True)], force=False)
    assert plan.evict == [] and keys(plan.terminating) == ["going"]
