"""Helpers of the operator and proxy tests (importable as ``opsupport`` from this directory)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
MANIFESTS = Path(__file__).parent / "manifests"


def kustomize(path: Path) -> list[dict[str, Any]]:
    """``kubectl kustomize PATH`` as a list of documents."""
    out = subprocess.run(["kubectl", "kustomize", str(path)], capture_output=True, text=True, check=True).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]
