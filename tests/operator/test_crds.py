"""The CRDs accept KubeOS manifests unchanged and describe every field the typed models read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from kubeos_operator import models

REPO = Path(__file__).resolve().parents[2]
CRDS = REPO / "deploy" / "crds"
MANIFESTS = Path(__file__).parent / "manifests"
KUBEOS_REQUIRED = [
    "checksum",
    "containerimage",
    "evictpodforce",
    "flagSafe",
    "imagetype",
    "imageurl",
    "maxunavailable",
    "mtls",
    "opstype",
    "osversion",
]


def crd(plural: str) -> dict[str, Any]:
    return dict(yaml.safe_load((CRDS / f"upgrade.openeuler.org_{plural}.yaml").read_text()))


def schema(plural: str) -> dict[str, Any]:
    return dict(crd(plural)["spec"]["versions"][0]["schema"]["openAPIV3Schema"])


def unknown_fields(value: Any, node: dict[str, Any], path: str = "") -> list[str]:
    """Fields of ``value`` the schema does not declare (the API server would prune them silently)."""
    if node.get("x-kubernetes-preserve-unknown-fields"):
        return []
    out: list[str] = []
    if isinstance(value, dict) and "properties" in node:
        for key, item in value.items():
            if key not in node["properties"]:
                out.append(f"{path}.{key}")
            else:
                out += unknown_fields(item, node["properties"][key], f"{path}.{key}")
    elif isinstance(value, list) and "items" in node:
        for index, item in enumerate(value):
            out += unknown_fields(item, node["items"], f"{path}[{index}]")
    return out


def test_both_crds_are_namespaced_v1alpha1_with_a_status_subresource() -> None:
    for plural, kind in (("os", "OS"), ("osinstances", "OSInstance")):
        spec = crd(plural)["spec"]
        assert spec["group"] == "upgrade.openeuler.org"
        assert spec["scope"] == "Namespaced"
        assert spec["names"]["kind"] == kind and spec["names"]["plural"] == plural
        (version,) = spec["versions"]
        assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
        assert version["subresources"] == {"status": {}}


def test_os_schema_has_kubeos_required_list_enums_and_defaults() -> None:
    spec = schema("os")["properties"]["spec"]
    assert sorted(spec["required"]) == KUBEOS_REQUIRED
    props = spec["properties"]
    assert props["imagetype"]["enum"] == ["docker", "disk", "containerd"]
    assert props["opstype"]["enum"] == ["upgrade", "config", "rollback"]
    assert props["executionmode"] == {**props["executionmode"], "enum": ["serial", "parallel"], "default": "parallel"}
    assert props["nodeselector"]["default"] == "no-label"
    assert props["timeinterval"]["default"] == 15
    for name in ("maxunavailable", "timeinterval"):
        assert props[name]["type"] == "integer"
    for name in ("flagSafe", "mtls", "evictpodforce"):
        assert props[name]["type"] == "boolean"
    content = props["sysconfigs"]["properties"]["configs"]["items"]["properties"]["contents"]["items"]
    assert content["properties"]["value"] == {
        **content["properties"]["value"],
        "x-kubernetes-preserve-unknown-fields": True,
    }


def test_printer_columns_start_with_kubeos_columns() -> None:
    os_cols = [c["jsonPath"] for c in crd("os")["spec"]["versions"][0]["additionalPrinterColumns"]]
    assert os_cols[:3] == [".spec.osversion", ".spec.sysconfigs.version", ".spec.upgradeconfigs.version"]
    inst_cols = [c["jsonPath"] for c in crd("osinstances")["spec"]["versions"][0]["additionalPrinterColumns"]]
    assert inst_cols[:3] == [".spec.nodestatus", ".status.sysconfigs.version", ".status.upgradeconfigs.version"]
    assert ".status.phase" in inst_cols


def test_every_model_field_is_in_the_schema() -> None:
    os_props = schema("os")["properties"]
    full = models.OSSpec(maxfailures=2, healthchecks=models.HealthChecks(deadline=60, units=("kubelet.service",)))
    assert set(full.to_dict()) == set(os_props["spec"]["properties"])
    assert set(models.OSStatus(observedGeneration=1).to_dict()) == set(os_props["status"]["properties"])
    inst = schema("osinstances")["properties"]
    assert set(models.OSInstanceSpec().to_dict()) == set(inst["spec"]["properties"])
    assert set(models.OSInstanceStatus().to_dict()) == set(inst["status"]["properties"])
    phases = inst["status"]["properties"]["phase"]["enum"]
    assert phases == [p.value for p in models.Phase]


@pytest.mark.parametrize("manifest", sorted(p.name for p in MANIFESTS.glob("kubeos-*.yaml")))
def test_kubeos_manifests_validate_and_lose_no_field(manifest: str) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    obj = yaml.safe_load((MANIFESTS / manifest).read_text())
    os_schema = schema("os")
    jsonschema.validate(obj, os_schema)
    assert unknown_fields(obj["spec"], os_schema["properties"]["spec"], "spec") == []


def test_a_manifest_missing_a_kubeos_required_field_is_refused() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    obj = yaml.safe_load((MANIFESTS / "kubeos-upgrade.yaml").read_text())
    del obj["spec"]["checksum"]
    with pytest.raises(jsonschema.ValidationError, match="checksum"):
        jsonschema.validate(obj, schema("os"))
