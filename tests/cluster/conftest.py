"""Fixtures of the cluster tests: one real etcd + kube-apiserver per session (see apiserver.py).

``apiserver_cluster`` (session) builds kube-apiserver through scripts/build-kube-apiserver.sh when it is
not cached yet (minutes, once), starts the cluster and stops it at the end of the session. It skips the
tests, saying why, only when kube-apiserver cannot be built on this machine; with KUBEOS_REQUIRE_CLUSTER=1
that is a failure instead (for CI). ``cluster`` (per test) is the same cluster; the Nodes a test created
with ``create_node`` are deleted after it, together with the pods bound to them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from .apiserver import Cluster, ClusterUnavailable, build_kube_apiserver, running_cluster


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
