"""``kubeosctl`` (the installed console script) against a real agent: output, progress, exit codes."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from .conftest import Images
from .helpers import Node, agent_in_process, slow_server, start_op, wait_op

pytestmark = pytest.mark.loop
KUBEOSCTL = Path(sys.executable).parent / "kubeosctl"
MIB = 1024 * 1024


def ctl(node: Node, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(KUBEOSCTL), "--socket", str(node.socket), *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_status_as_text_and_json(make_node: Callable[..., Node]) -> None:
    node = make_node("fresh")
    with agent_in_process(node):
        text = ctl(node, "status")
        as_json = ctl(node, "--json", "status")
    assert text.returncode == 0, text.stderr
    assert "running    slot A" in text.stdout
    assert "slot A     KubeOS 1.0" in text.stdout and "committed, running" in text.stdout
    assert "slot B     (empty)" in text.stdout and "not bootable" in text.stdout
    assert as_json.returncode == 0
    body = json.loads(as_json.stdout)
    assert body["disk"]["running_slot"] == "A" and body["disk"]["slots"]["B"]["bootable"] is False


def test_upgrade_writes_arms_and_reboots_with_plain_progress_lines(
    make_node: Callable[..., Node], images: Images
) -> None:
    node = make_node("fresh")
    with agent_in_process(node), slow_server(images.www, 16 * MIB) as url:
        res = ctl(
            node, "upgrade", "--image", f"{url}/{images.v2.name}", "--sha256", images.v2_sha256,
            "--insecure-http", "--version", "2.0", "--tries", "2",
        )  # fmt: skip
        ops = json.loads(ctl(node, "--json", "operations").stdout)["operations"]
    assert res.returncode == 0, res.stderr
    lines = res.stderr.splitlines()
    assert "prepare_upgrade: writing" in "\n".join(lines), res.stderr
    assert any(line.startswith("prepare_upgrade: writing") and "% (" in line for line in lines)
    assert any(line.startswith("upgrade: ") for line in lines)
    assert "\r" not in res.stderr  # not a terminal: no bar redrawn in place
    assert "prepare_upgrade: done - slot B holds the verified image" in res.stdout
    assert "upgrade: done - slot B will boot on trial up to 2 times" in res.stdout
    env = node.grubenv()
    assert (env["kubeos_trial"], env["kubeos_tries"]) == ("B", "2")
    assert node.reboots() == ["reboot "]
    assert [op["kind"] for op in ops] == ["prepare_upgrade", "upgrade"]


def test_progress_bar_on_a_terminal(make_node: Callable[..., Node], images: Images) -> None:
    node = make_node("fresh")
    with agent_in_process(node), slow_server(images.www, 16 * MIB) as url:
        leader, follower = pty.openpty()
        proc = subprocess.Popen(
            [str(KUBEOSCTL), "--socket", str(node.socket), "upgrade", "--prepare-only", "--insecure-http",
             "--image", f"{url}/{images.v2.name}", "--sha256", images.v2_sha256],
            stdout=subprocess.PIPE, stderr=follower, text=True,
        )  # fmt: skip
        os.close(follower)
        out = b""
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        os.close(leader)
        assert proc.wait(timeout=60) == 0
    text = out.decode()
    assert "\r" in text and "[" in text and "MiB" in text and "#" in text, text


def test_exit_codes(make_node: Callable[..., Node], images: Images, tmp_path: Path) -> None:
    node = make_node("fresh")
    with agent_in_process(node):
        bad_checksum = ctl(node, "upgrade", "--image", str(images.v2), "--sha256", "0" * 64)
        refused = ctl(node, "upgrade", "--image", str(images.v2), "--sha256", "xyz")
        usage = ctl(node, "upgrade", "--image", str(images.v2))
        unknown = ctl(node, "operations", "op-20260101T000000Z-abcdef")
        with slow_server(images.www, 4 * MIB) as url:
            running = start_op(
                node, "prepare_upgrade", imageurl=f"{url}/{images.v2.name}", checksum=images.v2_sha256, flagSafe=True
            )
            busy = ctl(node, "mark-good")
            cancel = ctl(node, "cancel", running["id"])
            wait_op(node, running["id"])
        ok = ctl(node, "mark-good")
    unreachable = subprocess.run(
        [str(KUBEOSCTL), "--socket", str(tmp_path / "no.sock"), "status"], capture_output=True, text=True, check=False
    )
    assert bad_checksum.returncode == 1 and "sha256 of the image is" in bad_checksum.stderr
    assert refused.returncode == 2 and "checksum:" in refused.stderr
    assert usage.returncode == 2 and "--sha256" in usage.stderr
    assert unknown.returncode == 2
    assert busy.returncode == 3 and running["id"] in busy.stderr
    assert cancel.returncode == 0 and "canceled" in cancel.stdout
    assert ok.returncode == 0 and "mark_good: done" in ok.stdout
    assert unreachable.returncode == 4 and "no kubeos agent answers" in unreachable.stderr


def test_upgrade_image_fields_map_urls_to_disk_images_and_oci_references_to_container_images() -> None:
    from kubeos_agent.ctl import image_fields

    digest = "a" * 64
    assert image_fields("https://images.example/v2.ext4", digest, None, False) == {
        "imagetype": "disk",
        "imageurl": "https://images.example/v2.ext4",
        "format": "raw",
        "checksum": digest,
        "flagSafe": False,
    }
    assert image_fields("oci://registry.example:5000/kubeos/os@sha256:" + digest, digest, None, False) == {
        "imagetype": "containerd",
        "containerimage": "registry.example:5000/kubeos/os@sha256:" + digest,
        "checksum": digest,
        "flagSafe": False,
    }
    assert image_fields("/var/tmp/v2.tar", digest, "tar", False)["imageurl"] == "file:///var/tmp/v2.tar"
