"""prepare_upgrade with imagetype containerd/docker through the real daemon: the OS image is a container image in a
real registry (Debian's docker-registry on 127.0.0.1, TLS requiring a client certificate), pulled by digest with the
collection's own registry client, its layers written into the inactive slot."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from conftest import detach_all
from support.osimage import make_os_tree
from support.registry import Registry, layer_tar, make_image, make_index, registry_available, run_registry
from support.tls import Pki, make_pki

from .helpers import DaemonProcess, Node, run_op

pytestmark = pytest.mark.loop
REPO = "kubeos/os"


@dataclass(frozen=True)
class Published:
    registry: Registry
    pki: Pki
    digest: str  # of the index tagged v3 (amd64 + arm64)
    layers_size: int

    @property
    def image(self) -> str:
        return f"{self.registry.host}/{REPO}"


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Published]:
    if os.geteuid() != 0:
        pytest.skip("needs root (loop devices)")
    if not registry_available():
        pytest.skip("docker-registry is not installed (scripts/setup.sh installs it)")
    work = tmp_path_factory.mktemp("agent-oci")
    pki = make_pki(work / "pki")
    base = make_os_tree(work / "base", "2.9")
    (base / "etc/obsolete").write_text("removed by the upper layer\n")
    upper = work / "upper"
    (upper / "etc").mkdir(parents=True)
    (upper / "usr/lib").mkdir(parents=True)
    (upper / "usr/lib/os-release").write_text('NAME="KubeOS"\nVERSION_ID="3.0"\nPRETTY_NAME="KubeOS 3.0"\n')
    (upper / "etc/.wh.obsolete").write_bytes(b"")
    image = make_image([layer_tar(base), layer_tar(upper)])
    arm = make_image([layer_tar(make_os_tree(work / "arm", "3.0-arm"))], architecture="arm64")
    with run_registry(work / "registry", pki, client_cas=True) as registry:
        registry.push_image(REPO, image)
        registry.push_image(REPO, arm)
        index = make_index(
            [(arm, {"os": "linux", "architecture": "arm64"}), (image, {"os": "linux", "architecture": "amd64"})]
        )
        digest = registry.push_index(REPO, index, tag="v3")
        yield Published(registry, pki, digest, sum(len(layer.data) for layer in image.layers))


@pytest.fixture
def daemon(make_node: Callable[..., Node], published: Published) -> Iterator[tuple[Node, DaemonProcess]]:
    node = make_node("fresh")
    certs = node.root / "certs"
    for name in ("ca.crt", "client.crt", "client.key"):
        (certs / name).write_bytes((published.pki.directory / name).read_bytes())
    proc = DaemonProcess(node).start()
    try:
        yield node, proc
    finally:
        assert proc.stop() == 0
        detach_all(node.image)


def _fields(published: Published, **extra: object) -> dict[str, object]:
    return {
        "imagetype": "containerd",
        "containerimage": f"{published.image}:v3",
        "checksum": published.digest,
        "version": "KubeOS 3.0",
        "imageurl": "",
        "mtls": True,
        "cacert": "ca.crt",
        "clientcert": "client.crt",
        "clientkey": "client.key",
        **extra,
    }


def test_prepare_upgrade_pulls_a_container_image_by_digest_into_the_inactive_slot(
    daemon: tuple[Node, DaemonProcess], published: Published
) -> None:
    node, _proc = daemon
    active = node.slot_sha256("A")
    inactive = node.slot_sha256("B")

    # A checksum that is not the tag's digest: refused before the disk is touched, nothing committed.
    wrong = "sha256:" + "1" * 64
    failed = run_op(node, "prepare_upgrade", **_fields(published, checksum=wrong))
    assert failed["state"] == "failed", failed
    assert f"names {published.digest}, but the checksum is {wrong}" in failed["error"], failed["error"]
    assert node.slot_sha256("A") == active and node.slot_sha256("B") == inactive
    env = node.grubenv()
    assert env.get("kubeos_default") == "A" and "kubeos_B_image" not in env and not env.get("kubeos_trial")

    # Pinned by digest (the same one as the checksum), as imagetype docker: written and verified.
    op = run_op(
        node,
        "prepare_upgrade",
        **_fields(published, imagetype="docker", containerimage=f"{published.image}@{published.digest}"),
    )
    assert op["state"] == "succeeded", op
    result = op["result"]
    assert result["slot"] == "B" and result["version"] == "3.0" and result["version_matches"] is True
    assert result["sha256"] == published.digest.removeprefix("sha256:")
    assert result["image"] == f"{published.image}@{published.digest}" and result["layers"] == 2
    assert op["progress"]["bytes_done"] == op["progress"]["bytes_total"] == published.layers_size
    assert op["request"]["containerimage"] == f"{published.image}@{published.digest}"
    status = node.client().status().body
    assert status["disk"]["slots"]["B"]["bootable"] is True
    assert status["disk"]["slots"]["B"]["version"] == "3.0"
    assert status["disk"]["grub"]["default"] == "A" and status["disk"]["grub"]["trial"] is None
    assert node.slot_sha256("A") == active
    assert node.grubenv()["kubeos_B_image"] == published.digest.removeprefix("sha256:")

    # The same image by tag again: nothing to do.
    again = run_op(node, "prepare_upgrade", **_fields(published))
    assert again["state"] == "succeeded" and again["result"]["changed"] is False, again


def test_container_image_requests_are_checked_before_anything_runs(
    daemon: tuple[Node, DaemonProcess], published: Published
) -> None:
    node, _proc = daemon
    other = "sha256:" + "2" * 64
    bad = [
        (_fields(published, containerimage=""), "containerimage", "required"),
        (_fields(published, containerimage=f"https://{published.image}:v3"), "containerimage", "without a scheme"),
        (_fields(published, containerimage=f"{published.image}/UPPER:v3"), "containerimage", "not an image reference"),
        (_fields(published, containerimage=f"{published.image}@{other}"), "checksum", "must be the same"),
        (_fields(published, format="tar"), "format", "only applies to imagetype 'disk'"),
        (_fields(published, clientkey=""), "clientkey", "required when mtls"),
    ]
    for body, field, message in bad:
        resp = node.client().request("POST", "/v1/operations", {"operation": "prepare_upgrade", **body})
        assert resp.status == 400, (body, resp.body)
        assert resp.error["field"] == field and message in resp.error["message"], resp.error
