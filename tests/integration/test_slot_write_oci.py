"""kubeos.os.slot_write with oci:// sources, for real: Debian's docker-registry on 127.0.0.1 with TLS, images built
and pushed by the tests (support.registry), loop-backed disks.

The image under test has two layers: a base root filesystem (support.osimage.make_os_tree plus extras) and an upper
layer that changes files, deletes some (whiteouts), empties a directory (opaque whiteout), replaces a file by a
directory and a directory by a file, and changes a directory's metadata. Every test checks that the slot it must
not write kept its bytes.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import stat
import subprocess
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import ModuleResult, detach_all, run_playbook, sha256_of, tree_listing
from support.osimage import make_ext4_image, make_os_tree
from support.registry import (
    ImageParts,
    Registry,
    layer_tar,
    make_image,
    make_index,
    registry_available,
    run_registry,
)
from support.tls import Pki, make_pki

from ansible_collections.kubeos.os.plugins.module_utils import blockdev, fetch, imagewrite, oci, slots

pytestmark = pytest.mark.loop
MIB = 1024 * 1024
WRITE = "kubeos.os.slot_write"
REPO = "kubeos/os"
ARM = {"os": "linux", "architecture": "arm64", "variant": "v8"}
AMD = {"os": "linux", "architecture": "amd64"}


# --- pure logic: references, challenges ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "domain", "repository", "tag", "digest"),
    [
        (
            "oci://127.0.0.1:5000/kubeos/os@sha256:" + "A" * 64,
            "127.0.0.1:5000",
            "kubeos/os",
            None,
            "sha256:" + "a" * 64,
        ),
        ("registry.example.com/kubeos/os:v2", "registry.example.com", "kubeos/os", "v2", None),
        ("registry.example.com/a/b/c", "registry.example.com", "a/b/c", None, None),
        ("localhost/os:1.0-rc.1", "localhost", "os", "1.0-rc.1", None),
        ("[::1]:5000/os:v2", "[::1]:5000", "os", "v2", None),
        ("busybox", "docker.io", "library/busybox", None, None),
        ("openeuler/kubeos:v2", "docker.io", "openeuler/kubeos", "v2", None),
        ("reg:5000/os:v2@sha256:" + "b" * 64, "reg:5000", "os", "v2", "sha256:" + "b" * 64),
    ],
)
def test_references_are_parsed_as_docker_and_kubeos_write_them(
    text: str, domain: str, repository: str, tag: str | None, digest: str | None
) -> None:
    ref = oci.parse_reference(text)
    assert (ref.domain, ref.repository, ref.tag, ref.digest) == (domain, repository, tag, digest)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "https://registry.example.com/os",
        "registry.example.com/OS",
        "registry.example.com/os@sha512:" + "a" * 128,
        "registry.example.com/os@sha256:abc",
        "user:pass@registry.example.com/os",
        "registry.example.com/os:bad tag",
        "registry.example.com/os:-tag",
        "registry.example.com//os",
    ],
)
def test_bad_references_are_refused(text: str) -> None:
    with pytest.raises(oci.OciError):
        oci.parse_reference(text)


def test_www_authenticate_challenges_are_parsed() -> None:
    header = 'Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push"'
    assert oci.parse_challenges([header]) == [
        (
            "bearer",
            {"realm": "https://auth.example/token", "service": "registry.example", "scope": "repository:a/b:pull,push"},
        )
    ]
    assert oci.parse_challenges(['Basic realm="x \\"y\\"", Bearer realm=https://t/token']) == [
        ("basic", {"realm": 'x "y"'}),
        ("bearer", {"realm": "https://t/token"}),
    ]
    assert ("basic", {"realm": "r"}) in oci.parse_challenges(["Negotiate abc==", 'Basic realm="r"'])


# --- layer merge rules, on plain directories -------------------------------------------------------------------


def _tar_of(entries: list[tuple[str, str, Any]]) -> bytes:
    """A tar of (name, kind, payload): kind file (bytes), dir (mode), symlink (target), hardlink (target)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, payload in entries:
            info = tarfile.TarInfo(name)
            info.mtime = 1_700_000_000
            if kind == "file":
                info.size = len(payload)
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(payload))
                continue
            if kind == "dir":
                info.type, info.mode = tarfile.DIRTYPE, payload
            elif kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, payload
            elif kind == "hardlink":
                info.type, info.linkname = tarfile.LNKTYPE, payload
            tar.addfile(info)
    return out.getvalue()


def _apply(root: Path, data: bytes) -> None:
    digest = hashlib.sha256(data).hexdigest()
    src = root.parent / f"layer-{digest[:8]}.tar"
    src.write_bytes(data)
    with fetch.FileSource(f"file://{src}", str(src)) as stream:
        oci.apply_layer(stream, digest, str(root))


def test_layer_merge_follows_the_oci_whiteout_rules_and_stays_inside_the_tree(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (ownership)")
    root = tmp_path / "root"
    root.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_text("must survive\n")
    lower = _tar_of(
        [
            ("./", "dir", 0o755),
            ("etc/", "dir", 0o755),
            ("etc/config", "file", b"a file that becomes a directory\n"),
            ("etc/keep", "file", b"kept\n"),
            ("var/", "dir", 0o755),
            ("var/cache/", "dir", 0o755),
            ("var/cache/thing/", "dir", 0o755),
            ("var/cache/thing/inside", "file", b"a directory that becomes a file\n"),
            ("opt/", "dir", 0o755),
            ("opt/app/", "dir", 0o755),
            ("opt/app/old", "file", b"old\n"),
            ("opt/app/sub/", "dir", 0o755),
            ("opt/app/sub/deep", "file", b"deep\n"),
            ("gone/", "dir", 0o755),
            ("gone/file", "file", b"x\n"),
            ("usr/", "dir", 0o755),
            ("usr/lib/", "dir", 0o755),
            ("lib", "symlink", "usr/lib"),
            ("evil", "symlink", str(outside)),
            ("srv/", "dir", 0o755),
        ]
    )
    _apply(root, lower)
    upper = _tar_of(
        [
            ("etc/", "dir", 0o755),
            ("etc/config/", "dir", 0o750),
            ("etc/config/a.conf", "file", b"a=1\n"),
            ("var/", "dir", 0o755),
            ("var/cache/", "dir", 0o755),
            ("var/cache/thing", "file", b"now a file\n"),
            ("opt/", "dir", 0o755),
            ("opt/app/", "dir", 0o700),
            ("opt/app/.wh..wh..opq", "file", b""),
            ("opt/app/new", "file", b"new\n"),
            ("./.wh.gone", "file", b""),
            ("./.wh.missing", "file", b""),
            # No entries for lib/ and lib/modules/: directories the layer needs but does not list.
            ("lib/modules/x.ko", "file", b"module\n"),
            # Through an absolute symlink to a directory outside: must stay inside the tree.
            ("evil/.wh.victim", "file", b""),
            ("evil/planted", "file", b"planted\n"),
            ("srv/", "dir", 0o700),
            ("srv/new/", "dir", 0o755),
            ("srv/new/.wh.nothing", "file", b""),
            ("srv/new/f1", "file", b"linked\n"),
            ("srv/new/f2", "hardlink", "srv/new/f1"),
        ]
    )
    _apply(root, upper)

    assert (outside / "victim").read_text() == "must survive\n"
    assert sorted(os.listdir(outside)) == ["victim"]
    assert (root / "etc/config").is_dir() and (root / "etc/config/a.conf").read_text() == "a=1\n"
    assert stat.S_IMODE((root / "etc/config").stat().st_mode) == 0o750
    assert (root / "etc/keep").read_text() == "kept\n"
    assert (root / "var/cache/thing").is_file() and (root / "var/cache/thing").read_text() == "now a file\n"
    assert sorted(os.listdir(root / "opt/app")) == ["new"]
    assert stat.S_IMODE((root / "opt/app").stat().st_mode) == 0o700
    assert not (root / "gone").exists()
    # The implicit lib/ followed the lower layer's symlink lib -> usr/lib.
    assert (root / "lib").is_symlink() and (root / "usr/lib/modules/x.ko").read_text() == "module\n"
    # evil was not listed as a directory either, but its link leads outside: replaced by a directory here.
    assert (root / "evil").is_dir() and not (root / "evil").is_symlink()
    assert (root / "evil/planted").read_text() == "planted\n"
    assert stat.S_IMODE((root / "srv").stat().st_mode) == 0o700
    assert sorted(os.listdir(root / "srv/new")) == ["f1", "f2"]
    assert (root / "srv/new/f1").stat().st_ino == (root / "srv/new/f2").stat().st_ino
    leftovers = [p for p in root.rglob("*") if p.name.startswith((".wh.", oci.STAGING_PREFIX))]
    assert leftovers == []


def test_a_layer_reaching_out_of_the_tree_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(imagewrite.WriteError):
        _apply(root, _tar_of([("../escaped", "file", b"out\n")]))
    assert not (tmp_path / "escaped").exists()


def test_a_layer_with_a_wrong_digest_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    data = _tar_of([("file", "file", b"content\n")])
    src = tmp_path / "layer.tar"
    src.write_bytes(data)
    with fetch.FileSource(f"file://{src}", str(src)) as stream, pytest.raises(imagewrite.ChecksumMismatch):
        oci.apply_layer(stream, "0" * 64, str(root))


# --- the images in a real registry ----------------------------------------------------------------------------


@dataclass
class Trees:
    base: Path
    upper: Path
    expected: Path


def _build_trees(work: Path) -> Trees:
    base = make_os_tree(work / "base", "2.9")
    (base / "etc/motd").write_text("base motd\n")
    (base / "etc/config").write_text("a file that becomes a directory\n")
    (base / "var/lib").mkdir(parents=True)
    (base / "var/lib/removed-file").write_text("whited out\n")
    (base / "var/cache/thing").mkdir(parents=True)
    (base / "var/cache/thing/inside").write_text("a directory that becomes a file\n")
    (base / "usr/share/doc/gone").mkdir(parents=True)
    (base / "usr/share/doc/gone/README").write_text("whited out with its directory\n")
    (base / "usr/share/doc/stays").write_text("stays\n")
    (base / "opt/app/sub").mkdir(parents=True)
    (base / "opt/app/old.txt").write_text("old\n")
    (base / "opt/app/sub/deep.txt").write_text("deep\n")
    (base / "srv/data").mkdir(parents=True)
    (base / "srv/data/kept").write_text("kept\n")
    os.chmod(base / "srv/data", 0o755)
    os.setxattr(base / "srv/data", "user.kubeos", b"base")
    (base / "tmp").mkdir()
    os.chmod(base / "tmp", 0o1777)

    upper = work / "upper"
    for d in ("etc/config", "usr/lib", "usr/share/doc", "var/lib", "var/cache", "opt/app", "srv/data", "new/dir"):
        (upper / d).mkdir(parents=True, exist_ok=True)
    (upper / "etc/hostname").write_text("kubeos-oci\n")
    (upper / "etc/config/a.conf").write_text("a=1\n")
    (upper / "usr/lib/os-release").write_text('NAME="KubeOS"\nID=kubeos\nVERSION_ID="3.0"\nPRETTY_NAME="KubeOS 3.0"\n')
    (upper / "var/lib/.wh.removed-file").write_bytes(b"")
    (upper / "usr/share/doc/.wh.gone").write_bytes(b"")
    (upper / "var/cache/thing").write_text("now a file\n")
    (upper / "opt/app/.wh..wh..opq").write_bytes(b"")
    (upper / "opt/app/new.txt").write_text("new\n")
    (upper / "srv/data/added").write_text("added\n")
    os.chmod(upper / "srv/data", 0o700)
    os.chown(upper / "srv/data", 1234, 5678)
    os.setxattr(upper / "srv/data", "user.kubeos", b"upper")
    (upper / "new/dir/.wh.nothing").write_bytes(b"")
    (upper / "new/dir/f1").write_text("hard linked\n")
    os.link(upper / "new/dir/f1", upper / "new/dir/f2")

    expected = work / "expected"
    shutil.copytree(base, expected, symlinks=True)
    (expected / "etc/hostname").write_text("kubeos-oci\n")
    (expected / "etc/config").unlink()
    (expected / "etc/config").mkdir()
    (expected / "etc/config/a.conf").write_text("a=1\n")
    (expected / "usr/lib/os-release").write_text((upper / "usr/lib/os-release").read_text())
    (expected / "var/lib/removed-file").unlink()
    shutil.rmtree(expected / "usr/share/doc/gone")
    shutil.rmtree(expected / "var/cache/thing")
    (expected / "var/cache/thing").write_text("now a file\n")
    shutil.rmtree(expected / "opt/app")
    (expected / "opt/app").mkdir()
    (expected / "opt/app/new.txt").write_text("new\n")
    (expected / "srv/data/added").write_text("added\n")
    os.chmod(expected / "srv/data", 0o700)
    os.chown(expected / "srv/data", 1234, 5678)
    os.setxattr(expected / "srv/data", "user.kubeos", b"upper")
    (expected / "new/dir").mkdir(parents=True)
    (expected / "new/dir/f1").write_text("hard linked\n")
    os.link(expected / "new/dir/f1", expected / "new/dir/f2")
    return Trees(base, upper, expected)


@dataclass
class Published:
    registry: Registry
    pki: Pki
    trees: Trees
    image: ImageParts  # the amd64 OCI image (two gzip layers)
    index_digest: str  # OCI index (amd64 + arm64) tagged v3: what the checksum names
    docker_digest: str  # the same layers as a Docker v2 schema 2 manifest, tagged docker-v3
    arm_only_digest: str  # an index with only an arm64 image
    base_layer: bytes
    upper_layer: bytes

    def src(self, ref: str) -> str:
        return f"oci://{self.registry.host}/{ref}"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Published]:
    if os.geteuid() != 0:
        pytest.skip("needs root (ownership in the test trees, loop devices)")
    if not registry_available():
        pytest.skip("docker-registry is not installed (scripts/setup.sh installs it)")
    work = tmp_path_factory.mktemp("oci")
    trees = _build_trees(work)
    base_layer, upper_layer = layer_tar(trees.base), layer_tar(trees.upper)
    image = make_image([base_layer, upper_layer])
    arm = make_image([layer_tar(make_os_tree(work / "arm", "3.0-arm"))], architecture="arm64")
    docker = make_image([base_layer, upper_layer], docker=True)
    with run_registry(work / "registry", pki) as registry:
        registry.push_image(REPO, image)
        registry.push_image(REPO, arm)
        index_digest = registry.push_index(REPO, make_index([(arm, ARM), (image, AMD)]), tag="v3")
        docker_digest = registry.push_image(REPO, docker, tag="docker-v3")
        arm_only = registry.push_index(REPO, make_index([(arm, ARM)]), tag="arm-only")
        yield Published(registry, pki, trees, image, index_digest, docker_digest, arm_only, base_layer, upper_layer)


class Disk:
    def __init__(self, path: Path) -> None:
        self.path = path

    def state(self) -> slots.DiskState:
        with blockdev.attached(str(self.path), writable=False) as disk:
            return slots.read_state(disk, "/dev/null-root")

    def slot_hash(self, slot: str) -> str:
        with blockdev.attached(str(self.path), writable=False) as disk:
            part = blockdev.read_table(disk).by_name(slots.SLOT_NAMES[slot])
            assert part is not None
            return sha256_of(part.node)

    def env_bytes(self) -> bytes:
        with blockdev.attached(str(self.path), writable=False) as disk:
            layout = slots.recognise(blockdev.read_table(disk))
            with blockdev.mounted(layout.boot.node, readonly=True) as root:
                return (Path(root) / "grub/grubenv").read_bytes()

    def listing(self, slot: str) -> dict[str, tuple[Any, ...]]:
        with blockdev.attached(str(self.path), writable=False) as disk:
            part = blockdev.read_table(disk).by_name(slots.SLOT_NAMES[slot])
            assert part is not None
            with blockdev.mounted(part.node, readonly=True) as root:
                return tree_listing(Path(root))


@pytest.fixture(scope="module")
def base_disk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Laid out (96 MiB slots), OS 1.0 written into A and committed; B empty."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    work = tmp_path_factory.mktemp("oci-disk")
    v1 = work / "v1.ext4"
    v1_sha = make_ext4_image(make_os_tree(work / "tree-v1", "1.0"), v1, size_mib=24)
    image = work / "base.img"
    with open(image, "wb") as handle:
        handle.truncate(384 * MIB)
    tasks = [
        {"kubeos.os.disk_layout": {"device": str(image), "root_size": "96MiB"}},
        {WRITE: {"device": str(image), "slot": "A", "src": f"file://{v1}", "sha256": v1_sha}},
        {"kubeos.os.boot_slot": {"device": str(image), "state": "committed", "slot": "A"}},
    ]
    status, _, stdout = run_playbook(work / "runner", [{"hosts": "localhost", "gather_facts": False, "tasks": tasks}])
    try:
        assert status == "successful", stdout
        yield image
    finally:
        detach_all(image)


@pytest.fixture
def disk(base_disk: Path, tmp_path: Path) -> Iterator[Disk]:
    copy = tmp_path / "disk.img"
    subprocess.run(["cp", "--sparse=always", str(base_disk), str(copy)], check=True)
    try:
        yield Disk(copy)
    finally:
        detach_all(copy)


def _args(disk: Disk, published: Published, src: str, sha256: str, **extra: Any) -> dict[str, Any]:
    return {"device": str(disk.path), "src": src, "sha256": sha256, "ca_cert": str(published.pki.ca_cert), **extra}


def _run_writes(workdir: Path, many: list[dict[str, Any]], *, check: bool = False) -> list[ModuleResult]:
    """Several slot_write tasks in one playbook run (one ansible start), each allowed to fail."""
    tasks = [{"name": f"write {i}", WRITE: args, "ignore_errors": True} for i, args in enumerate(many)]
    _, events, stdout = run_playbook(
        workdir, [{"hosts": "localhost", "gather_facts": False, "tasks": tasks}], check=check
    )
    assert len(events) == len(many), stdout
    return [
        ModuleResult(
            status="failed" if ev["event"] == "runner_on_failed" or ev["res"].get("failed") else "ok",
            result=ev["res"],
            stdout=stdout,
        )
        for ev in events
    ]


def test_image_by_digest_is_written_merged_with_whiteouts_and_marked_bootable(
    disk: Disk, published: Published, run_module: Callable[..., ModuleResult]
) -> None:
    a_before = disk.slot_hash("A")
    digest = published.index_digest
    args = _args(disk, published, published.src(f"{REPO}@{digest}"), digest)
    res = run_module(WRITE, args)
    assert res.changed and not res.failed, res.result
    assert res.result["slot"] == "B"
    assert res.result["version"] == "3.0"
    assert res.result["sha256"] == digest.removeprefix("sha256:")
    assert res.result["image"] == f"{published.registry.host}/{REPO}@{digest}"
    assert res.result["layers"] == 2
    assert res.result["bytes_written"] == sum(len(layer.data) for layer in published.image.layers)
    state = disk.state()
    assert state.slots["B"].bootable and state.slots["B"].content.pretty_name == "KubeOS 3.0"
    assert state.slots["B"].part.label == "ROOT-B"
    assert state.grub.env["kubeos_B_image"] == digest.removeprefix("sha256:")
    assert state.grub.default == "A" and state.grub.trial is None
    assert disk.slot_hash("A") == a_before
    assert disk.listing("B") == tree_listing(published.trees.expected)

    env = disk.env_bytes()
    again = run_module(WRITE, args)
    assert not again.changed and not again.failed, again.result
    assert disk.env_bytes() == env


def test_a_tag_is_resolved_and_must_still_name_the_checksum(
    disk: Disk, published: Published, run_module: Callable[..., ModuleResult]
) -> None:
    a_before, b_before, env_before = disk.slot_hash("A"), disk.slot_hash("B"), disk.env_bytes()
    moved = run_module(WRITE, _args(disk, published, published.src(f"{REPO}:docker-v3"), published.index_digest))
    assert moved.failed
    assert f"names {published.docker_digest}" in moved.msg and "Nothing was written" in moved.msg, moved.msg
    assert (disk.slot_hash("A"), disk.slot_hash("B"), disk.env_bytes()) == (a_before, b_before, env_before)

    res = run_module(WRITE, _args(disk, published, published.src(f"{REPO}:docker-v3"), published.docker_digest))
    assert res.changed and not res.failed, res.result
    assert res.result["version"] == "3.0" and res.result["layers"] == 2
    state = disk.state()
    assert state.slots["B"].bootable
    assert state.grub.env["kubeos_B_image"] == published.docker_digest.removeprefix("sha256:")
    assert disk.slot_hash("A") == a_before
    assert disk.listing("B") == tree_listing(published.trees.expected)


def test_wrong_digests_and_images_are_refused_before_anything_is_written(
    disk: Disk, published: Published, tmp_path: Path
) -> None:
    a_before, b_before, env_before = disk.slot_hash("A"), disk.slot_hash("B"), disk.env_bytes()
    index, docker = published.index_digest, published.docker_digest
    unknown = "sha256:" + "0" * 64
    cases = [
        (published.src(f"{REPO}@{index}"), docker, {}, f"pins {index} but the checksum is {docker}"),
        (published.src(f"{REPO}:v3"), docker, {}, f"names {index}, but the checksum is {docker}"),
        (published.src(f"{REPO}@{unknown}"), unknown, {}, "is not in registry"),
        (published.src(f"{REPO}:no-such-tag"), index, {}, "MANIFEST_UNKNOWN"),
        (published.src(f"{REPO}:arm-only"), published.arm_only_digest, {}, "holds no image for linux/amd64"),
        (published.src(f"{REPO}:v3"), index, {"platform": "linux/s390x"}, "(it has: linux/amd64, linux/arm64/v8)"),
        (published.src(f"{REPO}:v3"), index, {"format": "tar"}, "does not apply to an oci:// image"),
        (published.src("Kubeos/OS:v3"), index, {}, "invalid repository"),
        (published.src(f"{REPO}:v3"), index, {"ca_cert": str(published.pki.bad_ca_cert)}, "certificate"),
    ]
    results = _run_writes(
        tmp_path / "refusals", [_args(disk, published, src, sha, **extra) for src, sha, extra, _ in cases]
    )
    for (src, _sha, _extra, message), res in zip(cases, results, strict=True):
        assert res.failed, (src, res.result)
        assert message in res.msg, (src, res.msg)
    assert (disk.slot_hash("A"), disk.slot_hash("B"), disk.env_bytes()) == (a_before, b_before, env_before)


def test_check_mode_resolves_the_image_and_writes_nothing(
    disk: Disk, published: Published, run_module: Callable[..., ModuleResult]
) -> None:
    env_before, b_before = disk.env_bytes(), disk.slot_hash("B")
    res = run_module(WRITE, _args(disk, published, published.src(f"{REPO}:v3"), published.index_digest), check=True)
    assert res.changed and not res.failed, res.result
    assert "would be written from" in res.result["message"] and published.index_digest in res.result["message"]
    assert disk.env_bytes() == env_before and disk.slot_hash("B") == b_before


def test_a_tampered_layer_fails_the_write_and_leaves_the_slot_not_bootable(
    disk: Disk, published: Published, run_module: Callable[..., ModuleResult], tmp_path: Path
) -> None:
    # An image of its own (an upper layer no other test uses), with uncompressed layers: GNU tar extracts the
    # tampered bytes without complaint, only the digest can tell.
    extra = tmp_path / "extra"
    (extra / "etc").mkdir(parents=True)
    (extra / "etc/unique").write_bytes(os.urandom(64 * 1024))
    image = make_image([published.base_layer, layer_tar(extra)], compress=False)
    registry = published.registry
    digest = registry.push_image("kubeos/tampered", image, tag="v1")
    registry.tamper(image.layers[1].digest)
    a_before = disk.slot_hash("A")
    res = run_module(WRITE, _args(disk, published, published.src("kubeos/tampered:v1"), digest))
    assert res.failed
    assert "layer 2 of 2" in res.msg and image.layers[1].digest.removeprefix("sha256:") in res.msg, res.msg
    state = disk.state()
    assert not state.slots["B"].marked_bootable and not state.slots["B"].bootable
    assert "kubeos_B_image" not in state.grub.env
    assert state.grub.default == "A" and state.grub.trial is None
    assert disk.slot_hash("A") == a_before


def test_a_registry_that_requires_client_certificates(
    disk: Disk, published: Published, run_module: Callable[..., ModuleResult], tmp_path: Path
) -> None:
    pki = published.pki
    with run_registry(tmp_path / "mtls-registry", pki, client_cas=True) as registry:
        digest = registry.push_image(REPO, published.image, tag="v3")
        src = f"oci://{registry.host}/{REPO}:v3"
        env_before, b_before = disk.env_bytes(), disk.slot_hash("B")
        bad = {"client_cert": str(pki.bad_client_cert), "client_key": str(pki.bad_client_key)}
        missing, wrong = _run_writes(
            tmp_path / "refused", [_args(disk, published, src, digest), _args(disk, published, src, digest, **bad)]
        )
        assert missing.failed and "client certificate" in missing.msg, missing.msg
        assert wrong.failed and "client certificate" in wrong.msg, wrong.msg
        assert disk.env_bytes() == env_before and disk.slot_hash("B") == b_before

        right = run_module(
            WRITE, _args(disk, published, src, digest, client_cert=str(pki.client_cert), client_key=str(pki.client_key))
        )
        assert right.changed and not right.failed, right.result
        assert right.result["version"] == "3.0"
        assert disk.state().slots["B"].bootable


def test_token_authentication_with_credentials_and_blobs_redirected_to_another_host(
    disk: Disk, published: Published, run_module: Callable[..., ModuleResult], tmp_path: Path
) -> None:
    users = {"puller": "pull-secret"}
    with run_registry(
        tmp_path / "token-registry", published.pki, auth="token", users=users, anonymous_pull=False, redirect=True
    ) as registry:
        digest = registry.push_image(REPO, published.image, tag="v3")
        src = f"oci://{registry.host}/{REPO}:v3"
        env_before = disk.env_bytes()
        anonymous, wrong = _run_writes(
            tmp_path / "refused",
            [
                _args(disk, published, src, digest),
                _args(disk, published, src, digest, registry_username="puller", registry_password="nope"),
            ],
        )
        assert anonymous.failed and "give registry_username and registry_password" in anonymous.msg, anonymous.msg
        assert wrong.failed and "check registry_username and registry_password" in wrong.msg, wrong.msg
        assert "nope" not in str(wrong.result)
        assert disk.env_bytes() == env_before

        assert registry.cdn is not None and registry.token_server is not None
        registry.cdn.requests.clear()
        registry.token_server.requests.clear()
        res = run_module(
            WRITE, _args(disk, published, src, digest, registry_username="puller", registry_password="pull-secret")
        )
        assert res.changed and not res.failed, res.result
        assert "pull-secret" not in str(res.result)
        assert disk.state().slots["B"].bootable
        # Every blob came from the CDN, and the registry's token never went there.
        blob_paths = sorted(r["path"] for r in registry.cdn.requests)
        wanted = sorted(registry.blob_file(b.digest) for b in [published.image.config, *published.image.layers])
        assert [str(registry.storage / p.lstrip("/")) for p in blob_paths] == [str(p) for p in wanted]
        assert all(r["authorization"] is None for r in registry.cdn.requests)
        # Pull scope only, for this repository, as the puller.
        assert {(r["user"], tuple(r["query"]["scope"])) for r in registry.token_server.requests} == {
            ("puller", (f"repository:{REPO}:pull",))
        }


def test_basic_authentication_of_the_registry_itself(disk: Disk, published: Published, tmp_path: Path) -> None:
    with run_registry(tmp_path / "basic-registry", published.pki, auth="basic", users={"puller": "pw"}) as registry:
        digest = registry.push_image(REPO, published.image, tag="v3")
        src = f"oci://{registry.host}/{REPO}:v3"
        anonymous, wrong, ok = _run_writes(
            tmp_path / "check",
            [
                _args(disk, published, src, digest),
                _args(disk, published, src, digest, registry_username="puller", registry_password="no"),
                _args(disk, published, src, digest, registry_username="puller", registry_password="pw"),
            ],
            check=True,
        )
        assert anonymous.failed and "asks for a user name and password" in anonymous.msg, anonymous.msg
        assert wrong.failed and "check registry_username" in wrong.msg, wrong.msg
        assert ok.changed and not ok.failed, ok.result
        assert "would be written" in ok.result["message"]
