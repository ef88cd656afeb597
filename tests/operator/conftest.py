"""Fixtures of the operator and proxy tests.

The cluster ones come from tests/cluster (one real etcd + kube-apiserver per session; see
docs/test-cluster.md), the node disks from tests/agent (disk images provisioned by the real collection).
Helpers live in ``opsupport.py``: ``from conftest import`` is not safe here, because every conftest.py of a
directory without ``__init__.py`` is the module ``conftest`` (tests/agent's import means tests/conftest.py).
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from cluster.apiserver import Cluster
from cluster.conftest import apiserver_cluster, cluster  # noqa: F401  (fixtures)
from opsupport import DEPLOY, kustomize


def _root_conftest() -> ModuleType:
    """tests/conftest.py under a name of its own (the name ``conftest`` is this module's while it loads)."""
    name = "_kubeos_tests_conftest"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "conftest.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules[name]


def _import_agent_fixtures(root: ModuleType) -> None:
    """Import tests/agent/conftest.py (its ``images`` fixture) with ``conftest`` meaning tests/conftest.py."""
    if "agent.conftest" in sys.modules:
        return
    saved = sys.modules.get("conftest")
    sys.modules["conftest"] = root
    try:
        importlib.import_module("agent.conftest")
    finally:
        if saved is not None:
            sys.modules["conftest"] = saved


_ROOT = _root_conftest()
_import_agent_fixtures(_ROOT)
images = sys.modules["agent.conftest"].images

# Test modules elsewhere do ``from conftest import run_playbook`` (meaning tests/conftest.py). Collected after
# this directory (pytest tests/operator tests/agent), ``conftest`` is this module: offer the same helpers
# (not the fixtures: those stay tests/conftest.py's).
for _name, _value in vars(_ROOT).items():
    if not _name.startswith("_") and _name not in globals() and type(_value).__name__ != "FixtureFunctionDefinition":
        globals()[_name] = _value


@pytest.fixture(scope="session")
def deployed(apiserver_cluster: Cluster) -> Iterator[Cluster]:  # noqa: F811
    """The CRDs, namespace and RBAC of deploy/ applied server-side (workloads are not: no kubelet here)."""
    docs = [d for d in kustomize(DEPLOY / "kustomize" / "base") if d["kind"] not in ("Deployment", "DaemonSet")]
    apiserver_cluster.apply(docs, field_manager="kubeos-deploy")
    yield apiserver_cluster
