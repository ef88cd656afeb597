"""The agent's ``configure`` operation through the real daemon: KubeOS sysconfigs applied by the collection
(kubeos.os.configure → kubeos.os.sysconfig), what was applied and what it replaced in the journal, bad
configs failing with their reason and nothing changed, bad requests refused with 400, and
``kubeosctl config -f``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from .helpers import DaemonProcess, Node, run_op

pytestmark = pytest.mark.loop
KUBEOSCTL = Path(sys.executable).parent / "kubeosctl"

FILES = {
    "etc/sysctl.conf": "# kernel settings\nvm.swappiness = 60\n",
    "proc/sys/net/ipv4/ip_forward": "0\n",
    "var/lib/kubelet/config.yaml": "# kubelet\nkind: KubeletConfiguration\nmaxPods: 110\n",
    "etc/containerd/config.toml": 'version = 2\n[plugins."io.containerd.grpc.v1.cri"]\n  sandbox_image = "pause:3.8"\n',
    "etc/security/limits.conf": "*    soft    nofile    1024\n",
}
SYSCONFIGS: dict[str, Any] = {
    "version": "v1",
    "configs": [
        {"model": "kernel.sysctl", "contents": [{"key": "net.ipv4.ip_forward", "value": "1"}]},
        {"model": "kernel.sysctl.persist", "configpath": "", "contents": [{"key": "vm.swappiness", "value": 10}]},
        {"model": "grub.cmdline.next", "contents": [{"key": "kubeos.testarg", "value": "1"}, {"key": "kubeos.flag", "value": ""}]},
        {"model": "kubernetes.kubelet", "contents": [
            {"key": "maxPods", "value": 200},
            # Configuration from a cluster object is data: Ansible must not evaluate it.
            {"key": "providerID", "value": "{{ 7 * 6 }}"},
        ]},
        {"model": "container.containerd", "contents": [
            {"key": 'plugins."io.containerd.grpc.v1.cri".sandbox_image', "value": "pause:3.9"},
        ]},
        {"model": "pam.limits", "contents": [{"key": "*", "value": "soft.nofile.65535"}]},
    ],
}  # fmt: skip


def tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def node_root(make_node: Callable[..., Node]) -> Iterator[tuple[Node, Path]]:
    """A node (slot A running, B empty), its files in a temporary root, and its agent as a real daemon."""
    node = make_node("fresh")
    root = node.root / "tree"
    for rel, text in FILES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    node.configure(configure_root=str(root))
    daemon = DaemonProcess(node).start()
    try:
        yield node, root
    finally:
        assert daemon.stop() == 0


def test_configure_applies_every_model_and_journals_what_it_replaced(node_root: tuple[Node, Path]) -> None:
    node, root = node_root
    op = run_op(node, "configure", **SYSCONFIGS)
    assert op["state"] == "succeeded", op["error"]
    assert op["kind"] == "configure" and op["result"]["version"] == "v1" and op["result"]["changed"] is True

    assert (root / "proc/sys/net/ipv4/ip_forward").read_text() == "1\n"
    assert (root / "etc/sysctl.conf").read_text() == "# kernel settings\nvm.swappiness = 10\n"
    kubelet = (root / "var/lib/kubelet/config.yaml").read_text()
    assert kubelet == "# kubelet\nkind: KubeletConfiguration\nmaxPods: 200\nproviderID: '{{ 7 * 6 }}'\n"
    assert 'sandbox_image = "pause:3.9"' in (root / "etc/containerd/config.toml").read_text()
    assert (root / "etc/security/limits.conf").read_text() == "*    soft    nofile    65535\n"
    env = node.grubenv()
    assert env["kubeos_B_cmdline"] == "kubeos.testarg=1 kubeos.flag"
    assert "kubeos_A_cmdline" not in env  # the running slot is untouched

    record = json.loads((node.journal_dir / f"{op['id']}.json").read_text())
    assert record["state"] == "succeeded" and record["request"]["configs"][2]["model"] == "grub.cmdline.next"
    applied = {(e["model"], c["key"]): c for e in record["result"]["applied"] for c in e["contents"]}
    assert applied[("kernel.sysctl", "net.ipv4.ip_forward")] | {} == {
        "key": "net.ipv4.ip_forward", "operation": "set", "before": "0", "after": "1", "changed": True,
    }  # fmt: skip
    assert (applied[("kernel.sysctl.persist", "vm.swappiness")]["before"], applied[("kernel.sysctl.persist", "vm.swappiness")]["after"]) == ("60", "10")  # fmt: skip
    assert applied[("kubernetes.kubelet", "maxPods")]["before"] == 110
    assert applied[("grub.cmdline.next", "kubeos.flag")]["after"] == "kubeos.flag"
    assert [e["slot"] for e in record["result"]["applied"] if e["model"] == "grub.cmdline.next"] == ["B"]
    assert "/etc/sysctl.conf" in record["result"]["changed_targets"]

    again = run_op(node, "configure", **SYSCONFIGS)
    assert again["state"] == "succeeded" and again["result"]["changed"] is False
    assert again["result"]["message"] == "nothing to change"
    assert node.reboots() == []


def test_a_bad_config_fails_with_its_reason_and_changes_nothing(node_root: tuple[Node, Path]) -> None:
    node, root = node_root
    before, env_before = tree(root), node.grubenv()
    bad = {
        "version": "v2",
        "configs": [
            *SYSCONFIGS["configs"],
            {"model": "kernel.sysctl", "contents": [{"key": "net.ipv4.tcp_no_such_setting", "value": 1}]},
        ],
    }
    op = run_op(node, "configure", **bad)
    assert op["state"] == "failed"
    assert "configs[6].contents[0]" in op["error"] and "does not exist on this node" in op["error"], op["error"]
    assert "nothing was changed" in op["error"]
    assert tree(root) == before and node.grubenv() == env_before


def test_dry_run_reports_the_changes_and_writes_nothing(node_root: tuple[Node, Path]) -> None:
    node, root = node_root
    before, env_before = tree(root), node.grubenv()
    op = run_op(node, "configure", dry_run=True, **SYSCONFIGS)
    assert op["state"] == "succeeded", op["error"]
    assert op["result"]["dry_run"] is True and op["result"]["changed"] is True
    assert op["result"]["message"].startswith("would change kernel.sysctl net.ipv4.ip_forward")
    assert tree(root) == before and node.grubenv() == env_before


BAD_REQUESTS: list[tuple[str, dict[str, Any], str, str]] = [
    ("unknown model", {"configs": [{"model": "kernel.swap"}]}, "configs.0.model", "Input should be"),
    ("content without key", {"configs": [{"model": "pam.limits", "contents": [{"value": "x"}]}]}, "configs.0.contents.0.key", "field required"),
    ("unknown operation", {"configs": [{"model": "pam.limits", "contents": [{"key": "*", "operation": "drop"}]}]}, "configs.0.contents.0.operation", "Input should be"),
    ("relative configpath", {"configs": [{"model": "pam.limits", "configpath": "etc/x"}]}, "configs.0.configpath", "absolute path"),
    ("configpath traversal", {"configs": [{"model": "pam.limits", "configpath": "/etc/security/../shadow"}]}, "configs.0.configpath", "'..'"),
    ("configpath on sysctl", {"configs": [{"model": "kernel.sysctl", "configpath": "/etc/x"}]}, "configs.0.configpath", "has no configpath"),
    ("unknown field", {"configs": [], "sysconfigs": {}}, "sysconfigs", "unknown field"),
    ("dry_run a string", {"configs": [], "dry_run": "yes"}, "dry_run", "valid boolean"),
]  # fmt: skip


@pytest.mark.parametrize(("body", "field", "message"), [b[1:] for b in BAD_REQUESTS], ids=[b[0] for b in BAD_REQUESTS])
def test_bad_configure_requests_get_400_naming_the_field(
    node_root: tuple[Node, Path], body: dict[str, Any], field: str, message: str
) -> None:
    node, _root = node_root
    resp = node.client().request("POST", "/v1/operations", json.dumps({"operation": "configure", **body}).encode())
    assert resp.status == 400, resp.body
    assert resp.error["field"] == field and message in resp.error["message"], resp.error
    assert list(node.journal_dir.glob("*.json")) == []


def ctl(node: Node, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(KUBEOSCTL), "--socket", str(node.socket), *args], capture_output=True, text=True, timeout=180, check=False
    )


def test_kubeosctl_config_applies_an_os_objects_sysconfigs(node_root: tuple[Node, Path], tmp_path: Path) -> None:
    node, root = node_root
    manifest = {
        "apiVersion": "upgrade.openeuler.org/v1alpha1",
        "kind": "OS",
        "metadata": {"name": "os-sample"},
        "spec": {"opstype": "config", "osversion": "KubeOS 1.0", "sysconfigs": SYSCONFIGS},
    }
    path = tmp_path / "os.yaml"
    path.write_text(yaml.safe_dump(manifest))
    out = ctl(node, "config", "-f", str(path))
    assert out.returncode == 0, out.stderr
    assert "configure: done - changed kernel.sysctl net.ipv4.ip_forward" in out.stdout
    assert '  kernel.sysctl.persist /etc/sysctl.conf: vm.swappiness "60" -> "10"' in out.stdout
    assert (root / "etc/sysctl.conf").read_text().endswith("vm.swappiness = 10\n")

    again = ctl(node, "--json", "config", "-f", str(path))
    assert again.returncode == 0 and json.loads(again.stdout)["result"]["changed"] is False

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"configs": [{"model": "kernel.sysctl", "contents": [{"key": "a..b", "value": 1}]}]}))
    failed = ctl(node, "config", "-f", str(bad))
    assert failed.returncode == 1 and "is not a sysctl key" in failed.stderr

    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("hello: world\n")
    refused = ctl(node, "config", "-f", str(wrong))
    assert refused.returncode == 2 and "must hold KubeOS sysconfigs" in refused.stderr
    assert os.path.exists(path)
