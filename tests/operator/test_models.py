"""The typed views read KubeOS manifests and API objects, and write what the CRDs accept."""

from __future__ import annotations

from pathlib import Path

import yaml

from kubeos_operator import names
from kubeos_operator.models import (
    OS,
    ConfigSet,
    Content,
    NodeView,
    OSInstance,
    OSSpec,
    Phase,
    SysConfig,
    set_condition,
)

MANIFESTS = Path(__file__).parent / "manifests"


def load(name: str) -> OS:
    return OS.from_dict(yaml.safe_load((MANIFESTS / name).read_text()))


def test_kubeos_upgrade_manifest_parses_into_typed_spec() -> None:
    os = load("kubeos-upgrade.yaml")
    spec = os.spec
    assert os.key == "default/os-sample"
    assert (spec.opstype, spec.osversion, spec.imagetype, spec.maxunavailable) == ("upgrade", "KubeOS v2", "disk", 2)
    assert spec.mtls and (spec.cacert, spec.clientcert, spec.clientkey) == ("ca.crt", "client.crt", "client.key")
    assert spec.nodeselector == "edge" and spec.executionmode == "serial" and spec.timeinterval == 30
    assert (spec.timewindow.starttime, spec.timewindow.endtime) == ("22:00:00", "04:00:00")
    assert spec.sysconfigs.version == "v2-conf"
    assert [c.model for c in spec.sysconfigs.configs] == [
        "kernel.sysctl",
        "kernel.sysctl.persist",
        "grub.cmdline.current",
        "grub.cmdline.next",
    ]
    persist = spec.sysconfigs.configs[1]
    assert persist.configpath == "/etc/sysctl.conf"
    assert persist.contents == (Content("vm.swappiness", 10), Content("kernel.pid_max", None, "delete"))
    kubelet = spec.upgradeconfigs.configs[0]
    assert kubelet.contents[1].value == {"cpu": "100m", "memory": "100Mi"}
    # kubeos additions keep their defaults when a KubeOS manifest leaves them out.
    assert (spec.paused, spec.maxfailures, spec.maxretries, spec.allowcontrolplane) == (False, None, 3, False)
    assert spec.problems() == []


def test_kubeos_defaults_apply_when_left_out() -> None:
    spec = load("kubeos-config.yaml").spec
    assert spec.nodeselector == names.SELECT_NO_LABEL
    assert spec.timeinterval == 15 and spec.executionmode == "parallel"
    assert spec.timewindow.always
    assert spec.target == "v1-tuned"


def test_spec_round_trips_through_to_dict() -> None:
    for name in ("kubeos-upgrade.yaml", "kubeos-config.yaml", "kubeos-rollback.yaml"):
        spec = load(name).spec
        assert OSSpec.from_dict(spec.to_dict()) == spec


def test_problems_name_the_field_to_fix() -> None:
    assert "osversion" in OSSpec(opstype="upgrade", osversion="").problems()[0]
    assert "sysconfigs.version" in OSSpec(opstype="config").problems()[0]
    assert "opstype" in OSSpec(opstype="reboot", osversion="x").problems()[0]


def test_cmdline_swap_exchanges_current_and_next_only() -> None:
    configs = ConfigSet(
        "1",
        (
            SysConfig("grub.cmdline.current", contents=(Content("a", "1"),)),
            SysConfig("grub.cmdline.next", contents=(Content("b"),)),
            SysConfig("kernel.sysctl", contents=(Content("c", 1),)),
        ),
    )
    swapped = configs.with_cmdline_swapped()
    assert [c.model for c in swapped.configs] == ["grub.cmdline.next", "grub.cmdline.current", "kernel.sysctl"]
    assert [c.contents for c in swapped.configs] == [c.contents for c in configs.configs]
    assert swapped.with_cmdline_swapped() == configs


def test_node_view_reads_a_node_as_the_api_returns_it() -> None:
    node = NodeView.from_dict(
        {
            "metadata": {"name": "n1", "labels": {names.LABEL_CONTROL_PLANE: "", names.LABEL_UPGRADING: ""}},
            "spec": {"unschedulable": True},
            "status": {"nodeInfo": {"osImage": "KubeOS v1"}, "conditions": [{"type": "Ready", "status": "True"}]},
        }
    )
    assert node.control_plane and node.unschedulable and node.ready
    assert node.os_image == "KubeOS v1"
    assert node.operation_label == names.LABEL_UPGRADING


def test_osinstance_failed_on_matches_only_the_same_operation() -> None:
    inst = OSInstance.from_dict(
        {
            "metadata": {"name": "n1", "namespace": "default"},
            "spec": {"nodestatus": "idle"},
            "status": {"phase": "failed", "os": "default/os", "opstype": "upgrade", "target": "KubeOS v2"},
        }
    )
    assert not inst.busy
    assert inst.status.phase == Phase.FAILED
    assert inst.failed_on("default/os", "upgrade", "KubeOS v2")
    assert not inst.failed_on("default/os", "upgrade", "KubeOS v3")
    assert not inst.failed_on("default/other", "upgrade", "KubeOS v2")


def test_condition_transition_time_moves_only_on_status_change() -> None:
    conds = set_condition((), "Complete", False, "NodesLeft", "", "t1")
    conds = set_condition(conds, "Complete", False, "NodesLeft", "1 of 2", "t2")
    assert conds[0].lastTransitionTime == "t1" and conds[0].message == "1 of 2"
    conds = set_condition(conds, "Complete", True, "AllNodesUpdated", "", "t3")
    assert conds[0].lastTransitionTime == "t3" and len(conds) == 1
