"""module_utils.imagewrite against real loop devices, a real HTTPS server (test CA, mTLS) and GNU tar."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import pytest

from ansible_collections.kubeos.os.plugins.module_utils.fetch import (
    ImageSource,
    SourceError,
    SourceOptions,
    open_source,
)
from ansible_collections.kubeos.os.plugins.module_utils.imagewrite import (
    Cancelled,
    ChecksumMismatch,
    WriteError,
    WriteResult,
    extract_tar,
    write_raw,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.support.tls import Pki, file_server, make_pki

MIB = 1024 * 1024
# Odd size on purpose: the last chunk is not a multiple of the block size (O_DIRECT tail path).
IMAGE_SIZE = 9 * MIB + 1234

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (loop devices, mknod, chown)")
pytestmark = [needs_root]


# --------------------------------------------------------------------------- helpers and fixtures


@dataclass
class Image:
    path: Path
    data: bytes
    sha256: str

    @property
    def url(self) -> str:
        return f"file://{self.path}"


def sha256_of(path: Path | str, limit: Optional[int] = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read() if limit is None else f.read(limit))
    return h.hexdigest()


def device_size(dev: str) -> int:
    fd = os.open(dev, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


@contextlib.contextmanager
def loop_device(backing: Path) -> Iterator[str]:
    dev = subprocess.run(
        ["losetup", "--find", "--show", str(backing)], check=True, capture_output=True, text=True
    ).stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "--detach", dev], check=False)


def make_target(path: Path, size: int, fill: int = 0xA5) -> Path:
    path.write_bytes(bytes([fill]) * size)
    return path


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not installed")
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def image(tmp_path: Path) -> Image:
    data = os.urandom(IMAGE_SIZE)
    path = tmp_path / "www" / "rootfs.img"
    path.parent.mkdir()
    path.write_bytes(data)
    return Image(path, data, hashlib.sha256(data).hexdigest())


@pytest.fixture
def loopdev(tmp_path: Path) -> Iterator[str]:
    """A 16 MiB loop device whose backing file is filled with 0xA5."""
    backing = make_target(tmp_path / "slot-b.img", 16 * MIB)
    with loop_device(backing) as dev:
        yield dev


class SlowSource:
    """Wraps a source and hands out at most ``step`` bytes per read, ``delay`` seconds apart."""

    def __init__(self, inner: ImageSource, step: int = 256 * 1024, delay: float = 0.02) -> None:
        self.inner = inner
        self.step = step
        self.delay = delay
        self.delivered = 0

    @property
    def length(self) -> Optional[int]:
        return self.inner.length

    def read(self, n: int) -> bytes:
        time.sleep(self.delay)
        data = self.inner.read(min(n, self.step))
        self.delivered += len(data)
        return data


# --------------------------------------------------------------------------- raw writes


@pytest.mark.loop
def test_raw_write_from_file_url_fills_the_loop_device(image: Image, loopdev: str) -> None:
    calls: list[tuple[int, Optional[int]]] = []
    with open_source(SourceOptions(url=image.url)) as src:
        result = write_raw(
            src,
            loopdev,
            "sha256:" + image.sha256.upper(),
            capacity=device_size(loopdev),
            progress=lambda done, total: calls.append((done, total)),
        )
    assert isinstance(result, WriteResult)
    assert result.bytes_written == IMAGE_SIZE
    assert result.sha256 == image.sha256
    assert result.seconds > 0
    assert sha256_of(loopdev, IMAGE_SIZE) == image.sha256
    with open(loopdev, "rb") as dev:
        dev.seek(IMAGE_SIZE)
        assert dev.read(4096) == b"\xa5" * 4096, "bytes past the image must stay untouched"
    assert calls[-1] == (IMAGE_SIZE, IMAGE_SIZE)


def test_raw_write_into_a_regular_file_does_not_truncate(image: Image, tmp_path: Path) -> None:
    target = make_target(tmp_path / "slot.img", 12 * MIB)
    with open_source(SourceOptions(url=image.url)) as src:
        write_raw(src, str(target), image.sha256, capacity=12 * MIB, chunk_size=1 * MIB)
    assert target.stat().st_size == 12 * MIB
    content = target.read_bytes()
    assert content[:IMAGE_SIZE] == image.data
    assert content[IMAGE_SIZE:] == b"\xa5" * (12 * MIB - IMAGE_SIZE)


@pytest.mark.loop
def test_raw_write_from_https_with_the_test_ca(image: Image, loopdev: str, pki: Pki) -> None:
    with file_server(image.path.parent, pki=pki) as base:
        opts = SourceOptions(url=f"{base}/rootfs.img", ca_cert=str(pki.ca_cert))
        with open_source(opts) as src:
            assert src.length == IMAGE_SIZE
            result = write_raw(src, loopdev, image.sha256, capacity=device_size(loopdev))
    assert result.sha256 == image.sha256
    assert sha256_of(loopdev, IMAGE_SIZE) == image.sha256


def test_https_without_the_test_ca_is_refused(image: Image, pki: Pki) -> None:
    with file_server(image.path.parent, pki=pki) as base:
        url = f"{base}/rootfs.img"
        with pytest.raises(SourceError) as err:
            open_source(SourceOptions(url=url))
    assert url in str(err.value)
    assert "certificate" in str(err.value)


def test_https_missing_file_is_a_404_source_error(image: Image, pki: Pki) -> None:
    with file_server(image.path.parent, pki=pki) as base:
        url = f"{base}/no-such.img"
        with pytest.raises(SourceError) as err:
            open_source(SourceOptions(url=url, ca_cert=str(pki.ca_cert)))
    assert url in str(err.value)
    assert "404" in str(err.value)


@pytest.mark.loop
def test_mtls_with_the_right_client_certificate_writes_the_image(image: Image, loopdev: str, pki: Pki) -> None:
    with file_server(image.path.parent, pki=pki, require_client_cert=True) as base:
        opts = SourceOptions(
            url=f"{base}/rootfs.img",
            ca_cert=str(pki.ca_cert),
            client_cert=str(pki.client_cert),
            client_key=str(pki.client_key),
        )
        with open_source(opts) as src:
            result = write_raw(src, loopdev, image.sha256, capacity=device_size(loopdev))
    assert result.sha256 == image.sha256
    assert sha256_of(loopdev, IMAGE_SIZE) == image.sha256


@pytest.mark.loop
@pytest.mark.parametrize("client", ["missing", "other-ca"])
def test_mtls_without_an_accepted_client_certificate_writes_nothing(
    image: Image, loopdev: str, pki: Pki, client: str
) -> None:
    before = sha256_of(loopdev)
    cert, key = (None, None) if client == "missing" else (str(pki.bad_client_cert), str(pki.bad_client_key))
    with file_server(image.path.parent, pki=pki, require_client_cert=True) as base:
        url = f"{base}/rootfs.img"
        opts = SourceOptions(url=url, ca_cert=str(pki.ca_cert), client_cert=cert, client_key=key)
        with pytest.raises(SourceError) as err, open_source(opts) as src:
            write_raw(src, loopdev, image.sha256, capacity=device_size(loopdev))
    assert url in str(err.value)
    assert sha256_of(loopdev) == before


@pytest.mark.loop
def test_wrong_checksum_raises_checksum_mismatch(image: Image, loopdev: str) -> None:
    wrong = hashlib.sha256(b"another image").hexdigest()
    with open_source(SourceOptions(url=image.url)) as src, pytest.raises(ChecksumMismatch) as err:
        write_raw(src, loopdev, wrong, capacity=device_size(loopdev))
    assert err.value.expected == wrong
    assert err.value.actual == image.sha256
    assert wrong in str(err.value) and image.sha256 in str(err.value)


def test_malformed_checksum_is_refused_before_writing(image: Image, tmp_path: Path) -> None:
    target = make_target(tmp_path / "slot.img", 12 * MIB)
    with open_source(SourceOptions(url=image.url)) as src, pytest.raises(WriteError, match="64 hex"):
        write_raw(src, str(target), "md5:abc", capacity=12 * MIB)
    assert target.read_bytes() == b"\xa5" * (12 * MIB)


@pytest.mark.loop
def test_too_large_image_is_refused_before_writing_a_byte(image: Image, tmp_path: Path) -> None:
    backing = make_target(tmp_path / "small.img", 4 * MIB)
    with loop_device(backing) as dev:
        before = sha256_of(dev)
        capacity = device_size(dev)
        with open_source(SourceOptions(url=image.url)) as src, pytest.raises(WriteError) as err:
            write_raw(src, dev, image.sha256, capacity=capacity)
        assert sha256_of(dev) == before
    assert str(IMAGE_SIZE) in str(err.value)
    assert str(capacity) in str(err.value)


@pytest.mark.parametrize("length_mode", ["chunked", "close"])
def test_stream_without_content_length_is_written_and_verified(
    image: Image, tmp_path: Path, pki: Pki, length_mode: str
) -> None:
    target = make_target(tmp_path / "slot.img", 12 * MIB)
    with (
        file_server(image.path.parent, pki=pki, length_mode=length_mode) as base,
        open_source(SourceOptions(url=f"{base}/rootfs.img", ca_cert=str(pki.ca_cert))) as src,
    ):
        assert src.length is None
        result = write_raw(src, str(target), image.sha256, capacity=12 * MIB)
    assert result.bytes_written == IMAGE_SIZE
    assert target.read_bytes()[:IMAGE_SIZE] == image.data


def test_stream_without_length_past_capacity_aborts_without_writing_past_it(
    image: Image, tmp_path: Path, pki: Pki
) -> None:
    target = make_target(tmp_path / "slot.img", 16 * MIB)
    capacity = 4 * MIB
    with (
        file_server(image.path.parent, pki=pki, length_mode="close") as base,
        open_source(SourceOptions(url=f"{base}/rootfs.img", ca_cert=str(pki.ca_cert))) as src,
        pytest.raises(WriteError) as err,
    ):
        write_raw(src, str(target), image.sha256, capacity=capacity, chunk_size=1 * MIB)
    assert str(capacity) in str(err.value)
    assert target.read_bytes()[capacity:] == b"\xa5" * (16 * MIB - capacity)


@pytest.mark.parametrize("length_mode", ["content-length", "chunked"])
def test_download_cut_short_is_a_source_error(image: Image, tmp_path: Path, pki: Pki, length_mode: str) -> None:
    target = make_target(tmp_path / "slot.img", 12 * MIB)
    with (
        file_server(image.path.parent, pki=pki, length_mode=length_mode, cut_after=3 * MIB) as base,
        open_source(SourceOptions(url=f"{base}/rootfs.img", ca_cert=str(pki.ca_cert))) as src,
        pytest.raises(SourceError) as err,
    ):
        write_raw(src, str(target), image.sha256, capacity=12 * MIB)
    assert "rootfs.img" in str(err.value)
    assert "retry" in str(err.value)


def test_plain_http_works_only_when_allowed(image: Image, tmp_path: Path) -> None:
    target = make_target(tmp_path / "slot.img", 12 * MIB)
    with file_server(image.path.parent) as base:
        url = f"{base}/rootfs.img"
        with pytest.raises(SourceError, match="allow_insecure_http"):
            open_source(SourceOptions(url=url))
        with open_source(SourceOptions(url=url, allow_insecure_http=True)) as src:
            write_raw(src, str(target), image.sha256, capacity=12 * MIB)
    assert target.read_bytes()[:IMAGE_SIZE] == image.data


@pytest.mark.loop
def test_cancel_stops_the_write_promptly(image: Image, loopdev: str) -> None:
    with open_source(SourceOptions(url=image.url)) as inner:
        src = SlowSource(inner)
        start = time.monotonic()
        with pytest.raises(Cancelled):
            write_raw(
                src,
                loopdev,
                image.sha256,
                capacity=device_size(loopdev),
                chunk_size=1 * MIB,
                should_cancel=lambda: src.delivered >= 2 * MIB,
            )
        elapsed = time.monotonic() - start
    assert src.delivered < IMAGE_SIZE // 2
    assert elapsed < 5


def test_progress_is_reported_periodically_not_per_chunk(image: Image, tmp_path: Path) -> None:
    target = make_target(tmp_path / "slot.img", 12 * MIB)
    calls: list[tuple[float, int, Optional[int]]] = []
    with open_source(SourceOptions(url=image.url)) as inner:
        src = SlowSource(inner, step=64 * 1024, delay=0.01)  # ~1.5 s for the image
        start = time.monotonic()
        write_raw(
            src,
            str(target),
            image.sha256,
            capacity=12 * MIB,
            chunk_size=256 * 1024,
            progress=lambda done, total: calls.append((time.monotonic(), done, total)),
        )
        elapsed = time.monotonic() - start
    assert calls[-1][1:] == (IMAGE_SIZE, IMAGE_SIZE)
    assert 2 <= len(calls) <= elapsed / 0.5 + 2
    done = [c[1] for c in calls]
    assert done == sorted(done)


@pytest.mark.loop
def test_mounted_device_is_refused(image: Image, tmp_path: Path) -> None:
    backing = make_target(tmp_path / "active.img", 16 * MIB, fill=0)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with loop_device(backing) as dev:
        subprocess.run(["mkfs.ext4", "-q", dev], check=True)
        subprocess.run(["mount", dev, str(mnt)], check=True)
        try:
            with open_source(SourceOptions(url=image.url)) as src, pytest.raises(WriteError, match="in use"):
                write_raw(src, dev, image.sha256, capacity=device_size(dev))
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
        # Mounting and unmounting change the superblock, so compare against the image instead.
        with open(dev, "rb") as f:
            assert f.read(MIB) != image.data[:MIB]
        subprocess.run(["e2fsck", "-fn", dev], check=True, capture_output=True)


# --------------------------------------------------------------------------- tar extraction


def build_tree(root: Path) -> None:
    """A small root file system with everything tar must keep."""
    root.mkdir()
    for d in ("etc", "usr/bin", "dev", "run", "tmp", "home/user", "var/empty"):
        (root / d).mkdir(parents=True)
    hosts = root / "etc/hosts"
    hosts.write_text("127.0.0.1 localhost\n")
    os.setxattr(hosts, "user.kubeos.role", b"config")
    os.setxattr(hosts, "user.empty", b"")
    os.setxattr(root / "etc", "user.dir-attr", b"\x00\x01binary")
    (root / "etc/shadow").write_text("root:*:19000:0:99999:7:::\n")
    os.chmod(root / "etc/shadow", 0o640)
    os.chown(root / "etc/shadow", 0, 42)

    busybox = root / "usr/bin/busybox"
    busybox.write_bytes(os.urandom(300 * 1024))
    os.chmod(busybox, 0o755)
    os.link(busybox, root / "usr/bin/sh")
    os.link(busybox, root / "usr/bin/mount")
    os.symlink("busybox", root / "usr/bin/ls")
    os.symlink("/usr/bin/busybox", root / "usr/bin/absolute-link")
    os.symlink("../../nowhere/at/all", root / "usr/bin/dangling")
    os.lchown(root / "usr/bin/ls", 4321, 8765)

    su = root / "usr/bin/su"
    su.write_bytes(b"#!/bin/sh\n")
    os.chmod(su, 0o4755)
    sgid = root / "usr/bin/wall"
    sgid.write_bytes(b"wall")
    os.chown(sgid, 0, 5)
    os.chmod(sgid, 0o2711)
    os.chmod(root / "tmp", 0o1777)
    os.chmod(root / "var/empty", 0o000)

    os.mknod(root / "dev/null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.chmod(root / "dev/null", 0o666)
    os.mknod(root / "dev/loop-test", 0o660 | stat.S_IFBLK, os.makedev(7, 200))
    os.chown(root / "dev/loop-test", 0, 6)
    os.chmod(root / "dev/loop-test", 0o660)
    os.mkfifo(root / "run/initctl", 0o600)
    os.chmod(root / "run/initctl", 0o600)

    home = root / "home/user"
    (home / ".profile").write_text("export PS1='$ '\n")
    (home / "empty").touch()
    os.chown(home / ".profile", 1234, 5678)
    os.chown(home / "empty", 1234, 5678)
    os.chmod(home / "empty", 0o600)
    os.chown(home, 1234, 5678)
    os.chmod(home, 0o2750)
    if shutil.which("setfacl"):
        subprocess.run(["setfacl", "-m", "u:2000:r--", str(home / ".profile")], check=True)
    # Give every entry (not the links) a fixed, distinct mtime: tar must restore those too.
    for i, p in enumerate(sorted(root.rglob("*"))):
        if not p.is_symlink():
            os.utime(p, (1_600_000_000 + i, 1_600_000_000 + i))
    os.utime(root, (1_500_000_000, 1_500_000_000))


def snapshot(root: Path) -> dict[str, dict[str, Any]]:
    """(type, mode, owner, size, link target, rdev, xattrs, mtime, hard-link group, content) per entry."""
    first_path_of_inode: dict[tuple[int, int], str] = {}
    entries: dict[str, dict[str, Any]] = {}
    paths = [root, *sorted(root.rglob("*"))]
    for p in paths:
        rel = "." if p == root else str(p.relative_to(root))
        st = os.lstat(p)
        kind = stat.S_IFMT(st.st_mode)
        entry: dict[str, Any] = {
            "type": kind,
            "mode": oct(stat.S_IMODE(st.st_mode)),
            "uid": st.st_uid,
            "gid": st.st_gid,
            "xattrs": {n: os.getxattr(p, n, follow_symlinks=False) for n in os.listxattr(p, follow_symlinks=False)},
        }
        if stat.S_ISLNK(st.st_mode):
            entry["link"] = os.readlink(p)
        else:
            entry["mtime"] = int(st.st_mtime)
        if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            entry["rdev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
        if stat.S_ISREG(st.st_mode):
            entry["size"] = st.st_size
            entry["sha256"] = sha256_of(p)
            entry["hardlink_group"] = first_path_of_inode.setdefault((st.st_dev, st.st_ino), rel)
        entries[rel] = entry
    return entries


def make_tar(src: Path, archive: Path, compression: str) -> None:
    argv = ["tar", "--create", f"--file={archive}", "--format=posix", "--xattrs", "--xattrs-include=*"]
    argv += ["--acls", "--numeric-owner", f"--directory={src}", "."]
    if compression:
        argv.insert(2, compression)
    subprocess.run(argv, check=True, capture_output=True)


@pytest.mark.parametrize("compression", ["", "--gzip", "--xz", "--zstd"])
def test_tar_extraction_keeps_owners_modes_xattrs_links_and_devices(tmp_path: Path, compression: str) -> None:
    if compression == "--zstd" and shutil.which("zstd") is None:
        pytest.skip("zstd not installed")
    src = tmp_path / "src"
    build_tree(src)
    archive = tmp_path / "rootfs.tar"
    make_tar(src, archive, compression)
    dest = tmp_path / "dest"
    dest.mkdir()
    expected = sha256_of(archive)
    calls: list[tuple[int, Optional[int]]] = []
    with open_source(SourceOptions(url=f"file://{archive}")) as source:
        result = extract_tar(source, str(dest), expected, progress=lambda d, t: calls.append((d, t)))
    assert result.sha256 == expected
    assert result.bytes_written == archive.stat().st_size
    assert calls[-1] == (result.bytes_written, result.bytes_written)

    want, got = snapshot(src), snapshot(dest)
    assert sorted(got) == sorted(want)
    for path in want:
        assert got[path] == want[path], path
    # The checks above would pass vacuously if the tree lacked what it is meant to cover.
    assert want["usr/bin/sh"]["hardlink_group"] == "usr/bin/busybox"
    assert want["etc/hosts"]["xattrs"]["user.kubeos.role"] == b"config"
    assert want["dev/null"]["rdev"] == (1, 3)
    assert want["usr/bin/su"]["mode"] == "0o4755"
    assert want["home/user"]["uid"] == 1234


def test_tar_over_https_in_chunked_encoding(tmp_path: Path, pki: Pki) -> None:
    src = tmp_path / "src"
    build_tree(src)
    www = tmp_path / "www"
    www.mkdir()
    make_tar(src, www / "rootfs.tar.gz", "--gzip")
    dest = tmp_path / "dest"
    dest.mkdir()
    with file_server(www, pki=pki, length_mode="chunked") as base:
        opts = SourceOptions(url=f"{base}/rootfs.tar.gz", ca_cert=str(pki.ca_cert))
        with open_source(opts) as source:
            extract_tar(source, str(dest), sha256_of(www / "rootfs.tar.gz"))
    assert snapshot(dest) == snapshot(src)


def test_tar_with_wrong_checksum_raises_checksum_mismatch(tmp_path: Path) -> None:
    src = tmp_path / "src"
    build_tree(src)
    archive = tmp_path / "rootfs.tar"
    make_tar(src, archive, "--gzip")
    dest = tmp_path / "dest"
    dest.mkdir()
    wrong = "0" * 64
    with open_source(SourceOptions(url=f"file://{archive}")) as source, pytest.raises(ChecksumMismatch) as err:
        extract_tar(source, str(dest), wrong)
    assert err.value.expected == wrong
    assert err.value.actual == sha256_of(archive)


def test_tar_failure_is_a_write_error_with_tars_message(tmp_path: Path) -> None:
    archive = tmp_path / "not-a.tar"
    archive.write_bytes(os.urandom(64 * 1024))
    dest = tmp_path / "dest"
    dest.mkdir()
    with open_source(SourceOptions(url=f"file://{archive}")) as source, pytest.raises(WriteError) as err:
        extract_tar(source, str(dest), sha256_of(archive))
    assert "does not look like a tar archive" in str(err.value)


def test_tar_members_escaping_the_slot_are_refused(tmp_path: Path) -> None:
    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tar:
        for name in ("ok.txt", "../escape.txt", "sub/../../escape2.txt"):
            info = tarfile.TarInfo(name)
            info.size = 2
            tar.addfile(info, io.BytesIO(b"hi"))
    dest = tmp_path / "dest"
    dest.mkdir()
    with open_source(SourceOptions(url=f"file://{archive}")) as source, pytest.raises(WriteError) as err:
        extract_tar(source, str(dest), sha256_of(archive))
    assert "'..'" in str(err.value)
    assert not (tmp_path / "escape.txt").exists()
    assert not (tmp_path / "escape2.txt").exists()


def test_tar_extraction_can_be_cancelled(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "big").write_bytes(os.urandom(8 * MIB))
    archive = tmp_path / "rootfs.tar"
    make_tar(src, archive, "")
    dest = tmp_path / "dest"
    dest.mkdir()
    threads_before = threading.active_count()
    with open_source(SourceOptions(url=f"file://{archive}")) as inner:
        source = SlowSource(inner)
        with pytest.raises(Cancelled):
            extract_tar(source, str(dest), sha256_of(archive), should_cancel=lambda: source.delivered >= MIB)
    assert source.delivered < 4 * MIB
    assert threading.active_count() == threads_before
    assert not _zombie_children("tar"), "tar was not reaped"


def _zombie_children(command: str) -> list[int]:
    """Zombie children of this process running ``command`` (other children, e.g. test servers, may exist)."""
    zombies = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8") as handle:
                stat_line = handle.read()
        except OSError:
            continue
        comm = stat_line[stat_line.index("(") + 1 : stat_line.rindex(")")]
        state, ppid = stat_line[stat_line.rindex(")") + 2 :].split()[:2]
        if comm == command and state == "Z" and int(ppid) == os.getpid():
            zombies.append(int(entry))
    return zombies


def test_missing_extraction_directory_is_reported(tmp_path: Path) -> None:
    archive = tmp_path / "a.tar"
    archive.write_bytes(b"\0" * 10240)
    with open_source(SourceOptions(url=f"file://{archive}")) as source, pytest.raises(WriteError, match="mount"):
        extract_tar(source, str(tmp_path / "nope"), sha256_of(archive))
