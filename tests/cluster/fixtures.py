"""The cluster fixtures, registered once by tests/conftest.py (a session fixture defined in two conftest files
would start two API servers in one run).

``apiserver_cluster`` (session) builds kube-apiserver through scripts/build-kube-apiserver.sh when it is
not cached yet (minutes, once), starts the cluster and stops it at the end of the session. It skips the
tests, saying why, only when kube-apiserver cannot be built on this machine; with KUBEOS_REQUIRE_CLUSTER=1
that is a failure instead (for CI). ``cluster`` (per test) is the same cluster; the Nodes a test created
with ``create_node`` are deleted after it, together with the pods bound to them. ``deployed`` (session) is
the cluster with deploy/'s CRDs, namespace and RBAC applied server-side.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from .apiserver import Cluster, ClusterUnavailable, build_kube_apiserver, running_cluster

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


def kustomize(path: Path) -> list[dict[str, Any]]:
    """``kubectl kustomize PATH`` as a list of documents."""
    out = subprocess.run(["kubectl", "kustomize", str(path)], capture_output=True, text=True, check=True).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


@pytest.fixture(scope="session")
def apiserver_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    try:
        binary = build_kube_apiserver()
    except ClusterUnavailable as exc:
        if os.environ.get("KUBEOS_REQUIRE_CLUSTER") == "1":
            pytest.fail(str(exc), pytrace=False)
        pytest.skip(str(exc))
    with running_cluster(tmp_path_factory.mktemp("cluster"), apiserver_binary=binary) as cluster:
        yield cluster


@pytest.fixture
def cluster(apiserver_cluster: Cluster) -> Iterator[Cluster]:
    mark = apiserver_cluster.checkpoint()
    try:
        yield apiserver_cluster
    finally:
        apiserver_cluster.delete_nodes_since(mark)


@pytest.fixture(scope="session")
def deployed(apiserver_cluster: Cluster) -> Iterator[Cluster]:
    """The CRDs, namespace and RBAC of deploy/ applied server-side (workloads are not: no kubelet here)."""
    docs = [d for d in kustomize(DEPLOY / "kustomize" / "base") if d["kind"] not in ("Deployment", "DaemonSet")]
    apiserver_cluster.apply(docs, field_manager="kubeos-deploy")
    yield apiserver_cluster
