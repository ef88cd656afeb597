#!/usr/bin/env python3
"""Build the kubeos boot-test OS: a Debian kernel, a busybox initramfs and root filesystems v1, v2, v3.

Results are cached outside the repository, in ``$KUBEOS_TESTOS_CACHE`` (default /var/cache/kubeos/testos),
under ``out/``, and rebuilt only when missing or when the builder's inputs changed: the stamp is the sha256
of every file of this directory (this script, the init scripts, the shell library). The Debian kernel
package stays in ``debs/`` across rebuilds. A lock file serialises concurrent builders.

Outputs (``out/``; ``manifest.json`` lists them with sizes and hashes):

- ``vmlinuz-<kver>`` and ``initrd.img-<kver>``: the kernel of Debian's ``linux-image-amd64`` (the real
  ``linux-image-6.x-amd64`` package it depends on) and a gzip'd newc cpio with busybox-static, the modules
  for virtio disks, ext4 and overlay (dependencies from modules.dep made by ``busybox depmod``, soft
  dependencies from the modules' own modinfo, aliases from modules.alias) and ``/init``;
- ``rootfs-vN.tar`` and ``rootfs-vN.ext4`` (each with ``.sha256``) for v1 and v2, which boot, and v3, whose
  init fails so that the kernel panics.

Run it as root (it writes the cache and runs mkfs): ``python3 tools/vmtest/testos/build.py [--force]``, or
``scripts/build-test-os.sh``. Needs: apt-get, dpkg-deb, busybox-static, e2fsprogs, GNU tar.
"""

from __future__ import annotations

import argparse
import fnmatch
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

try:
    from vmtest.buildcache import load_manifest, locked
except ImportError:  # run as a script (scripts/build-*.sh): tools/ is not on sys.path then
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from vmtest.buildcache import load_manifest, locked

HERE = Path(__file__).resolve().parent
DEFAULT_CACHE = "/var/cache/kubeos/testos"
META_PACKAGE = "linux-image-amd64"
BUSYBOX = "/bin/busybox"
# What the initramfs needs to mount a virtio disk's ext4 root and overlay /etc (q35 or pc, OVMF).
WANTED_MODULES = ("virtio_pci", "virtio_blk", "ext4", "overlay")
# version -> does it boot
VERSIONS = {"v1": True, "v2": True, "v3": False}
EXT4_FEATURES = "^metadata_csum_seed,^orphan_file"
MIB = 1024 * 1024

Log = Callable[[str], None]


class BuildError(Exception):
    """The test OS cannot be built."""


def cache_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    return Path(explicit or os.environ.get("KUBEOS_TESTOS_CACHE") or DEFAULT_CACHE)


def input_files() -> list[Path]:
    return sorted(
        p for p in HERE.rglob("*") if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".pyc", ".pyo")
    )


def stamp() -> str:
    """sha256 over the builder's files (names and contents)."""
    digest = hashlib.sha256()
    for path in input_files():
        digest.update(path.relative_to(HERE).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def run(argv: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    res = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False, env=env)
    if res.returncode != 0:
        raise BuildError(f"{' '.join(argv)} failed ({res.returncode}):\n{res.stdout}{res.stderr}")
    return res.stdout


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(4 * MIB), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_sha256(path: Path) -> str:
    digest = file_sha256(path)
    Path(f"{path}.sha256").write_text(f"{digest}  {path.name}\n")
    return digest


# --- kernel --------------------------------------------------------------------------------------------------


def resolve_kernel_package(log: Log) -> str:
    """The real linux-image-6.x-amd64 package that linux-image-amd64 depends on (apt's candidate)."""

    def depends() -> list[str]:
        res = subprocess.run(["apt-cache", "depends", META_PACKAGE], capture_output=True, text=True, check=False)
        return re.findall(r"^\s*Depends:\s*(linux-image-\d\S*-amd64)\s*$", res.stdout, re.MULTILINE)

    found = depends()
    if not found:
        log("apt lists do not know linux-image-amd64: apt-get update")
        run(["apt-get", "update", "-qq"])
        found = depends()
    if not found:
        raise BuildError(f"cannot resolve the kernel package that {META_PACKAGE} depends on (apt-cache depends)")
    return found[0]


def fetch_kernel_deb(package: str, debs: Path, log: Log) -> Path:
    debs.mkdir(parents=True, exist_ok=True)
    have = sorted(debs.glob(f"{package}_*_amd64.deb"))
    if have:
        log(f"kernel package {have[-1].name} (cached)")
        return have[-1]
    log(f"apt-get download {package}")
    with tempfile.TemporaryDirectory(dir=debs) as tmp:
        # apt's _apt sandbox user cannot write here; the warning about that is expected and hidden.
        try:
            run(["apt-get", "download", "-qq", package], cwd=Path(tmp))
        except BuildError:
            log("apt-get download failed: apt-get update, then once more")
            run(["apt-get", "update", "-qq"])
            run(["apt-get", "download", "-qq", package], cwd=Path(tmp))
        got = sorted(Path(tmp).glob(f"{package}_*_amd64.deb"))
        if not got:
            raise BuildError(f"apt-get download {package} produced no .deb")
        os.replace(got[-1], debs / got[-1].name)
        for old in debs.glob("linux-image-*.deb"):
            if old.name != got[-1].name:
                old.unlink()
        return debs / got[-1].name


def modinfo(path: Path) -> dict[str, list[str]]:
    """The .modinfo section of a kernel module (ELF64 little-endian), as key -> values."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise BuildError(f"{path} is not an ELF64 little-endian module (compressed modules are not supported)")
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def section(index: int) -> tuple[int, int, int]:
        base = shoff + index * shentsize
        name, _type, _flags, _addr, offset, size = struct.unpack_from("<IIQQQQ", data, base)
        return name, offset, size

    _, str_off, _ = section(shstrndx)
    info: dict[str, list[str]] = {}
    for index in range(shnum):
        name, offset, size = section(index)
        end = data.index(b"\0", str_off + name)
        if data[str_off + name : end] == b".modinfo":
            for item in data[offset : offset + size].split(b"\0"):
                if b"=" in item:
                    key, value = item.decode(errors="replace").split("=", 1)
                    info.setdefault(key, []).append(value)
    return info


def module_name(relpath: str) -> str:
    return Path(relpath).name.split(".ko")[0].replace("-", "_")


def soft_pre(values: list[str]) -> list[str]:
    """The "pre:" names of modinfo softdep values such as "pre: crypto-crc32c post: foo"."""
    names: list[str] = []
    mode = ""
    for value in values:
        for word in value.split():
            if word.endswith(":"):
                mode = word
            elif mode == "pre:":
                names.append(word)
    return names


def resolve_modules(moddir: Path, wanted: tuple[str, ...]) -> list[tuple[str, bool]]:
    """Modules to load, in order, as (path relative to moddir, optional).

    Hard dependencies come from modules.dep, soft "pre:" dependencies from each module's modinfo (that is
    where depmod reads them), resolved through modules.alias. Every module a soft dependency's alias names
    is included and marked optional (e.g. crc32c_intel needs SSE4.2, crc32c_generic always loads).
    Built-in modules are skipped.
    """
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        if ":" not in line:
            continue
        mod, rest = line.split(":", 1)
        deps[mod] = rest.split()
        by_name[module_name(mod)] = mod
    builtin = {module_name(line) for line in (moddir / "modules.builtin").read_text().split()}
    aliases: list[tuple[str, str]] = []
    for line in (moddir / "modules.alias").read_text().splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "alias":
            aliases.append((parts[1], parts[2].replace("-", "_")))

    def expand(name: str) -> list[str]:
        name = name.replace("-", "_")
        if name in by_name or name in builtin:
            return [name]
        return sorted({target for pattern, target in aliases if fnmatch.fnmatchcase(name, pattern.replace("-", "_"))})

    order: list[tuple[str, bool]] = []
    seen: set[str] = set()

    def visit(name: str, optional: bool, stack: tuple[str, ...]) -> None:
        if name in builtin or name in seen:
            return
        if name not in by_name:
            raise BuildError(f"kernel module {name} is neither in modules.dep nor built in")
        if name in stack:
            raise BuildError(f"dependency loop: {' -> '.join((*stack, name))}")
        rel = by_name[name]
        for alias in soft_pre(modinfo(moddir / rel).get("softdep", [])):
            for target in expand(alias):
                visit(target, True, (*stack, name))
        for dep in deps[rel]:
            visit(module_name(dep), optional, (*stack, name))
        if name not in seen:
            seen.add(name)
            order.append((rel, optional))

    for want in wanted:
        resolved = expand(want)
        if not resolved:
            raise BuildError(f"kernel module {want} not found")
        for name in resolved:
            visit(name, False, ())
    return order


# --- initramfs -----------------------------------------------------------------------------------------------


class Cpio:
    """A newc cpio archive written in memory: owners root, mtime 0, so builds are reproducible."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1
        self.dirs: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", nlink: int = 1, rdev: tuple[int, int] = (0, 0)) -> None:
        encoded = name.encode() + b"\0"
        fields = (self.ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
        header = b"070701" + b"".join(f"{value:08X}".encode() for value in fields)
        self.buf.write(header + encoded)
        self.buf.write(b"\0" * (-(len(header) + len(encoded)) % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-len(data) % 4))
        self.ino += 1

    def dir(self, name: str) -> None:
        parts = name.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            path = "/".join(parts[:i])
            if path not in self.dirs:
                self.dirs.add(path)
                self._entry(path, stat.S_IFDIR | 0o755, nlink=2)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        name = name.strip("/")
        if "/" in name:
            self.dir(name.rsplit("/", 1)[0])
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        name = name.strip("/")
        if "/" in name:
            self.dir(name.rsplit("/", 1)[0])
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._entry(name.strip("/"), stat.S_IFCHR | mode, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0, nlink=1)
        data = self.buf.getvalue()
        return data + b"\0" * (-len(data) % 512)


def build_initramfs(kver: str, moddir: Path, modules: list[tuple[str, bool]], out: Path) -> None:
    archive = Cpio()
    for name in ("bin", "dev", "proc", "sys", "run", "tmp", "mnt/root", "mnt/persist", "etc"):
        archive.dir(name)
    archive.chardev("dev/console", 5, 1)
    archive.chardev("dev/null", 1, 3, 0o666)
    archive.file("bin/busybox", Path(BUSYBOX).read_bytes(), 0o755)
    archive.symlink("bin/sh", "busybox")
    archive.file("init", (HERE / "initramfs-init.sh").read_bytes(), 0o755)
    archive.file("lib/kubeos-test/common.sh", (HERE / "common.sh").read_bytes())
    order = []
    for rel, optional in modules:
        archive.file(f"lib/modules/{kver}/{rel}", (moddir / rel).read_bytes())
        order.append(f"{rel} optional" if optional else rel)
    archive.file("lib/modules/load-order", ("\n".join(order) + "\n").encode())
    archive.file("etc/kubeos-test-initramfs", f"kernel={kver}\nbuilder={stamp()}\n".encode())
    with open(out, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9, mtime=0) as gz:
        gz.write(archive.finish())


# --- root filesystems ----------------------------------------------------------------------------------------


def busybox_applets() -> list[str]:
    names = run([BUSYBOX, "--list"]).split()
    return sorted(n for n in names if re.fullmatch(r"[A-Za-z0-9_.+\[\]-]+", n) and n != "busybox")


def build_tree(tree: Path, version: str, boots: bool, kver: str, vmlinuz: Path, initrd: Path) -> None:
    for name in ("bin", "sbin", "etc/kubeos-test", "usr/lib", "boot", "dev", "proc", "sys", "run", "tmp", "persist"):
        (tree / name).mkdir(parents=True, exist_ok=True)
    os.chmod(tree / "tmp", 0o1777)
    shutil.copyfile(BUSYBOX, tree / "bin/busybox")
    os.chmod(tree / "bin/busybox", 0o755)
    for applet in busybox_applets():
        if not (tree / "bin" / applet).exists():
            os.symlink("busybox", tree / "bin" / applet)
    shutil.copyfile(HERE / "rootfs-init.sh", tree / "sbin/init")
    os.chmod(tree / "sbin/init", 0o755)
    (tree / "lib/kubeos-test").mkdir(parents=True)
    shutil.copyfile(HERE / "common.sh", tree / "lib/kubeos-test/common.sh")
    (tree / "usr/lib/os-release").write_text(
        f'NAME="KubeOS test"\nID=kubeos-test\nVERSION_ID={version}\nVERSION="{version}"\n'
        f'PRETTY_NAME="KubeOS test {version}"\n'
    )
    os.symlink("../usr/lib/os-release", tree / "etc/os-release")
    (tree / "etc/hostname").write_text(f"kubeos-test-{version}\n")
    (tree / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (tree / "etc/group").write_text("root:x:0:\n")
    (tree / "etc/kubeos-test/version").write_text(f"{version}\n")
    if not boots:
        (tree / "etc/kubeos-test/broken").write_text("init exits on purpose: the kernel panics\n")
    shutil.copyfile(vmlinuz, tree / f"boot/vmlinuz-{kver}")
    shutil.copyfile(initrd, tree / f"boot/initrd.img-{kver}")
    os.symlink(f"vmlinuz-{kver}", tree / "boot/vmlinuz")
    os.symlink(f"initrd.img-{kver}", tree / "boot/initrd.img")


def make_tar(tree: Path, out: Path) -> None:
    run(
        [
            "tar",
            "--create",
            "--file",
            str(out),
            "--directory",
            str(tree),
            "--sort=name",
            "--numeric-owner",
            "--owner=0",
            "--group=0",
            "--mtime=@0",
            "--format=gnu",
            ".",
        ]
    )


def tree_bytes(tree: Path) -> int:
    total = 0
    for path in tree.rglob("*"):
        st = path.lstat()
        total += (st.st_size + 4095) // 4096 * 4096 + 256  # blocks plus an inode each
    return total


def make_ext4(tree: Path, out: Path, version: str, seed: str) -> None:
    """An ext4 image of the tree with room to spare: used space * 1.25 + 8 MiB, in whole MiB."""
    size = (tree_bytes(tree) * 5 // 4 + 8 * MIB + MIB - 1) // MIB * MIB
    with open(out, "wb") as handle:
        handle.truncate(size)
    fs_uuid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"kubeos-testos:{seed}:{version}"))
    env = dict(os.environ, E2FSPROGS_FAKE_TIME="1")
    run(
        [
            "mkfs.ext4",
            "-q",
            "-F",
            "-L",
            f"kubeos-{version}",
            "-U",
            fs_uuid,
            "-E",
            f"hash_seed={fs_uuid},root_owner=0:0",
            "-O",
            EXT4_FEATURES,
            "-d",
            str(tree),
            str(out),
        ],
        env=env,
    )


# --- the whole build -----------------------------------------------------------------------------------------


def _build(cache: Path, out: Path, work: Path, the_stamp: str, log: Log) -> dict[str, Any]:
    started = time.monotonic()
    for tool in ("apt-get", "apt-cache", "dpkg-deb", "mkfs.ext4", "tar", BUSYBOX):
        if not shutil.which(tool):
            raise BuildError(f"{tool} is missing: install apt, dpkg, e2fsprogs, tar and busybox-static")
    package = resolve_kernel_package(log)
    deb = fetch_kernel_deb(package, cache / "debs", log)
    log(f"extracting {deb.name}")
    kroot = work / "kernel"
    run(["dpkg-deb", "-x", str(deb), str(kroot)])
    kvers = sorted(p.name for p in (kroot / "lib/modules").iterdir())
    if len(kvers) != 1:
        raise BuildError(f"expected one kernel in {deb.name}, found {kvers}")
    kver = kvers[0]
    moddir = kroot / "lib/modules" / kver
    log(f"busybox depmod {kver}")
    run([BUSYBOX, "depmod", "-b", str(kroot), kver])
    modules = resolve_modules(moddir, WANTED_MODULES)
    log(f"modules: {' '.join(module_name(rel) for rel, _ in modules)}")

    stage = work / "out"
    stage.mkdir()
    files: dict[str, dict[str, Any]] = {}

    def record(key: str, path: Path, sha_file: bool = False) -> None:
        digest = write_sha256(path) if sha_file else file_sha256(path)
        files[key] = {"name": path.name, "size": path.stat().st_size, "sha256": digest}

    vmlinuz = stage / f"vmlinuz-{kver}"
    shutil.copyfile(kroot / f"boot/vmlinuz-{kver}", vmlinuz)
    record("kernel", vmlinuz)
    initrd = stage / f"initrd.img-{kver}"
    log("initramfs")
    build_initramfs(kver, moddir, modules, initrd)
    record("initramfs", initrd)
    shutil.rmtree(kroot)

    for version, boots in VERSIONS.items():
        log(f"rootfs {version}{'' if boots else ' (broken: init fails, the kernel panics)'}")
        tree = work / f"tree-{version}"
        build_tree(tree, version, boots, kver, vmlinuz, initrd)
        make_tar(tree, stage / f"rootfs-{version}.tar")
        record(f"rootfs-{version}.tar", stage / f"rootfs-{version}.tar", sha_file=True)
        make_ext4(tree, stage / f"rootfs-{version}.ext4", version, the_stamp)
        record(f"rootfs-{version}.ext4", stage / f"rootfs-{version}.ext4", sha_file=True)
        shutil.rmtree(tree)

    manifest = {
        "stamp": the_stamp,
        "kernel_package": package,
        "kernel_deb": deb.name,
        "kernel_version": kver,
        "modules": [{"path": rel, "optional": optional} for rel, optional in modules],
        "versions": {version: {"boots": boots} for version, boots in VERSIONS.items()},
        "files": files,
        "build_seconds": round(time.monotonic() - started, 1),
    }
    (stage / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    # Swap the new outputs in.
    old = cache / "out.old"
    if old.exists():
        shutil.rmtree(old)
    if out.exists():
        os.replace(out, old)
    os.replace(stage, out)
    if old.exists():
        shutil.rmtree(old)
    return manifest


def ensure(
    cache: str | os.PathLike[str] | None = None, *, force: bool = False, log: Log | None = None
) -> dict[str, Any]:
    """Build the test OS unless an up-to-date build is cached; return its manifest with absolute paths.

    The returned manifest has ``dir`` (the output directory) and ``paths``: key -> absolute path, for
    ``kernel``, ``initramfs`` and ``rootfs-vN.tar`` / ``rootfs-vN.ext4``.
    """
    say: Log = log or (lambda msg: print(f"testos: {msg}", flush=True))
    root = cache_dir(cache)
    out = root / "out"
    the_stamp = stamp()
    with locked(root):
        manifest = None if force else load_manifest(out, the_stamp)
        if manifest is not None:
            say(f"up to date in {out} (stamp {the_stamp[:12]})")
        else:
            say(f"building into {out} (stamp {the_stamp[:12]})")
            work = Path(tempfile.mkdtemp(prefix="build.", dir=root))
            try:
                manifest = _build(root, out, work, the_stamp, say)
            finally:
                shutil.rmtree(work, ignore_errors=True)
            say(f"done in {manifest['build_seconds']} s")
    manifest["dir"] = str(out)
    manifest["paths"] = {key: str(out / entry["name"]) for key, entry in manifest["files"].items()}
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", help=f"cache directory (default $KUBEOS_TESTOS_CACHE or {DEFAULT_CACHE})")
    parser.add_argument("--force", action="store_true", help="rebuild even when the cached build is up to date")
    parser.add_argument("--print-manifest", action="store_true", help="print the manifest as JSON at the end")
    args = parser.parse_args(argv)
    try:
        manifest = ensure(args.cache, force=args.force)
    except BuildError as exc:
        print(f"testos: ERROR: {exc}", file=sys.stderr)
        return 1
    if args.print_manifest:
        print(json.dumps(manifest, indent=2))
    else:
        for key, entry in manifest["files"].items():
            print(f"testos: {key}: {entry['size'] / MIB:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
