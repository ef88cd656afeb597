"""Bad requests of every kind get 400 naming the field (or 404/405), and nothing is written or journaled."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from .conftest import Images
from .helpers import Node, agent_in_process

pytestmark = pytest.mark.loop

SHA = "a" * 64


@pytest.fixture(scope="module")
def agent_node(images: Images, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """One idle agent for all the bad requests of this module (none of them may change anything)."""
    import subprocess

    from conftest import detach_all

    from .helpers import node_settings, partitions_of

    root = tmp_path_factory.mktemp("requests")
    (root / "certs").mkdir()
    (root / "certs" / "ca.crt").write_text("not really a certificate\n")
    os.symlink("/etc/hostname", root / "certs" / "escape.crt")
    image = root / "disk.img"
    subprocess.run(["cp", "--sparse=always", str(images.fresh), str(image)], check=True)
    partitions = partitions_of(image)
    node = Node(root=root, image=image, partitions=partitions)
    node.configure(**node_settings(root, image, partitions))
    try:
        with agent_in_process(node):
            yield node
    finally:
        detach_all(image)


def prepare(**fields: Any) -> dict[str, Any]:
    return {"operation": "prepare_upgrade", "imageurl": "https://images.example/os.img", "checksum": SHA, **fields}


BAD: list[tuple[str, bytes | dict[str, Any] | list[Any], str, str]] = [
    ("not JSON", b"{nope", "body", "not valid JSON"),
    ("a JSON list", [1, 2], "body", "JSON object"),
    ("no operation", {"imageurl": "https://x/y"}, "operation", "field required"),
    ("operation not a string", {"operation": 7}, "operation", "must be a string"),
    ("unknown operation", {"operation": "format_disk"}, "operation", "unknown operation 'format_disk'"),
    (
        "configure unknown model",
        {"operation": "configure", "configs": [{"model": "kernel.foo"}]},
        "configs.0.model",
        "Input should be 'kernel.sysctl'",
    ),
    ("unknown field", prepare(imageUrl="https://x/y"), "imageUrl", "unknown field"),
    ("no checksum", {"operation": "prepare_upgrade", "imageurl": "https://x/y"}, "checksum", "field required"),
    ("short checksum", prepare(checksum="abc"), "checksum", "64 hex digits"),
    ("checksum not hex", prepare(checksum="z" * 64), "checksum", "64 hex digits"),
    ("checksum a number", prepare(checksum=12), "checksum", "valid string"),
    ("flagSafe as a string", prepare(flagSafe="true"), "flagSafe", "valid boolean"),
    ("mtls as a number", prepare(mtls=1), "mtls", "valid boolean"),
    ("imageurl a number", prepare(imageurl=5), "imageurl", "valid string"),
    ("version a list", prepare(version=["2"]), "version", "valid string"),
    ("imagetype unknown", prepare(imagetype="floppy"), "imagetype", "'disk', 'docker' or 'containerd'"),
    ("imagetype docker without image", prepare(imagetype="docker"), "containerimage", "required for imagetype"),
    (
        "containerimage pins another digest",
        prepare(imagetype="containerd", containerimage="r.example/os@sha256:" + "b" * 64),
        "checksum",
        "must be the same",
    ),
    ("format unknown", prepare(format="qcow2"), "format", "'raw' or 'tar'"),
    ("no imageurl", prepare(imageurl=""), "imageurl", "required"),
    ("ftp URL", prepare(imageurl="ftp://images.example/os.img"), "imageurl", "https://"),
    ("relative file URL", prepare(imageurl="file:os.img"), "imageurl", "absolute path"),
    ("credentials in URL", prepare(imageurl="https://u:p@images.example/os.img"), "imageurl", "credentials"),
    ("http without flagSafe", prepare(imageurl="http://images.example/os.img"), "flagSafe", "flagSafe: true"),
    ("mtls without client cert", prepare(mtls=True), "clientcert", "required when mtls"),
    ("mtls over http", prepare(imageurl="http://i.example/o", flagSafe=True, mtls=True), "mtls", "https://"),
    ("client cert without mtls", prepare(clientcert="client.crt"), "clientcert", "only used with mtls"),
    ("cacert escaping with ..", prepare(cacert="../../../etc/passwd"), "cacert", "outside the certificate directory"),
    ("cacert absolute elsewhere", prepare(cacert="/etc/passwd"), "cacert", "outside the certificate directory"),
    ("cacert symlink out", prepare(cacert="escape.crt"), "cacert", "outside the certificate directory"),
    ("cacert missing", prepare(cacert="missing.crt"), "cacert", "not a file"),
    ("cacert with NUL", prepare(cacert="ca\x00.crt"), "cacert", "NUL"),
    ("cacert for http", prepare(imageurl="http://i.example/o", flagSafe=True, cacert="ca.crt"), "cacert", "https"),
    ("tries zero", {"operation": "upgrade", "tries": 0}, "tries", "greater than or equal to 1"),
    ("tries ten", {"operation": "upgrade", "tries": 10}, "tries", "less than or equal to 9"),
    ("tries as a string", {"operation": "upgrade", "tries": "3"}, "tries", "valid integer"),
    ("reboot as a string", {"operation": "rollback", "reboot": "no"}, "reboot", "valid boolean"),
    ("health unknown key", {"operation": "upgrade", "health": {"probes": []}}, "health.probes", "unknown field"),
    ("health deadline zero", {"operation": "upgrade", "health": {"deadline": 0}}, "health.deadline", "greater than"),
    (
        "health command without argv",
        {"operation": "upgrade", "health": {"commands": [{"name": "x"}]}},
        "health.commands.0.argv",
        "field required",
    ),
    (
        "health probe not http",
        {"operation": "upgrade", "health": {"http": [{"url": "file:///etc/passwd"}]}},
        "health.http.0.url",
        "match pattern",
    ),
    (
        "health probe cacert outside",
        {
            "operation": "upgrade",
            "health": {"http": [{"url": "https://127.0.0.1:10250/healthz", "cacert": "/etc/passwd"}]},
        },
        "health.http.0.cacert",
        "outside the certificate directory",
    ),
    ("mark_good with a field", {"operation": "mark_good", "slot": "B"}, "slot", "unknown field"),
]


@pytest.mark.parametrize(("body", "field", "message"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_request_is_refused_naming_the_field(
    agent_node: Node, body: bytes | dict[str, Any] | list[Any], field: str, message: str
) -> None:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    resp = agent_node.client().request("POST", "/v1/operations", raw)
    assert resp.status == 400, resp.body
    assert resp.error["code"] == "bad_request"
    assert resp.error["field"] == field
    assert message in resp.error["message"], resp.error["message"]


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/v1/operations/op-20260101T000000Z-abcdef", 404),
        ("GET", "/v1/operations/../../etc/passwd", 404),
        ("POST", "/v1/operations/op-20260101T000000Z-abcdef/cancel", 404),
        ("GET", "/v2/status", 404),
        ("GET", "/v1/nothing", 404),
        ("POST", "/v1/status", 405),
        ("DELETE", "/v1/operations", 405),
        ("GET", "/v1/operations/op-20260101T000000Z-abcdef/cancel", 405),
    ],
)
def test_unknown_paths_and_methods(agent_node: Node, method: str, path: str, status: int) -> None:
    assert agent_node.client().request(method, path).status == status


def test_an_oversized_body_is_refused(agent_node: Node) -> None:
    resp = agent_node.client().request("POST", "/v1/operations", b"{" + b" " * 70_000 + b"}")
    assert resp.status == 413 and resp.error["field"] == "body"


def test_nothing_was_written_by_the_bad_requests(agent_node: Node, images: Images) -> None:
    """Runs after the tests above (file order): no journal record, no artifacts, the disk as provisioned."""
    assert sorted(p.name for p in agent_node.journal_dir.iterdir()) == []
    assert not (agent_node.root / "persist" / "runner").exists()
    env = agent_node.grubenv()
    assert env["kubeos_default"] == "A" and env["kubeos_B_bootable"] == "no" and "kubeos_trial" not in env
    assert agent_node.reboots() == []
    status = agent_node.client().status().body
    assert status["last_operation"] is None and status["current_operation"] is None


def test_socket_is_a_root_only_0600_socket(agent_node: Node) -> None:
    st = os.stat(agent_node.socket)
    assert oct(st.st_mode & 0o777) == "0o600"
    assert (st.st_uid, st.st_gid) == (0, 0)


def test_a_non_root_user_cannot_connect(agent_node: Node) -> None:
    import subprocess
    import sys

    code = (
        "import os, socket, sys\n"
        "os.setgid(65534); os.setuid(65534)\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "try:\n    s.connect(sys.argv[1])\nexcept PermissionError:\n    sys.exit(13)\n"
        "sys.exit(0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(agent_node.socket)], check=False)
    assert proc.returncode == 13


def test_peers_other_than_the_allowed_uids_are_refused(agent_node: Node, make_node: Callable[..., Node]) -> None:
    node = make_node("fresh")
    node.configure(allowed_uids=[4242])
    with agent_in_process(node):
        resp = node.client().status()
    assert resp.status == 403 and "uid 0" in resp.error["message"]
