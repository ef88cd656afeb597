"""Helpers of the operator and proxy tests (importable as ``opsupport`` from this directory)."""

from __future__ import annotations

from pathlib import Path

from cluster.fixtures import DEPLOY, REPO, kustomize

MANIFESTS = Path(__file__).parent / "manifests"

__all__ = ["DEPLOY", "MANIFESTS", "REPO", "kustomize"]
