#!/usr/bin/env python3
"""Build the kubeos node OS: Debian bookworm with systemd, python3, the os-agent and the kubeos.os collection.

Two stages, each cached under ``$KUBEOS_NODEOS_CACHE`` (default /var/cache/kubeos/nodeos) and rebuilt only
when its inputs changed (a sha256 stamp over them is kept in each stage's manifest):

``base/`` (slow: a few minutes, mostly downloads) — ``debootstrap --variant=minbase`` from the Debian mirror
  this machine's apt uses, then inside the root (``base-setup.sh``): systemd, udev, python3, util-linux,
  fdisk, e2fsprogs, dosfstools, mtools, the Debian kernel with an initramfs-tools initramfs of only the
  virtio/ext4 modules (``root=PARTUUID=`` is resolved by udev), kernel modules trimmed to what a VM needs, no
  documentation or translations, and the virtualenv ``/opt/kubeos/venv`` with the agent's Python dependencies
  (the ``dependencies`` of pyproject.toml except the operator's ``kubernetes``), installed offline from
  wheels that ``pip download`` fetched on this machine. Stored as ``base/rootfs.tar``.
  Inputs: the package list, the requirements, ``base-setup.sh`` and ``BASE_RECIPE``.

``out/<stamp>/`` (15 to 30 s) — the base unpacked, then the repository's own parts: the ``kubeos`` wheel (built
  from a copy of the sources, installed into the virtualenv without dependencies), the collection copied to
  /usr/share/ansible/collections/ansible_collections/kubeos/os, the agent's systemd unit
  (deploy/systemd/kubeos-agent.service) and everything under ``rootfs/`` here (agent configuration, fstab,
  the health unit, the test driver); the units enabled. Then, for v1 and v2 (they differ in os-release
  only), an upgrade payload made by the collection (playbooks/build_image.yml with ``disk=false``, i.e. the
  ``kubeos.os.image_payload`` module): ``node-vN.ext4`` with ``.ext4.sha256`` and ``node-vN.json``.
  Inputs: the base stamp, build.py and ``rootfs/``, the agent's sources, pyproject.toml, the unit and
  the collection. One directory per stamp: checkouts that share the cache do not pull the payloads from
  under each other's running tests; the builds not used lately are pruned.

Package downloads are kept in ``debs/`` and wheels in ``wheels/`` across rebuilds. A lock file serialises
concurrent builders. Every chroot step runs in its own mount and PID namespace (``unshare``), so neither
a mount nor a process outlives it, even when the build fails.

Run as root: ``python3 tools/vmtest/nodeos/build.py [--force] [--force-base]`` or
``scripts/build-node-os.sh``. Needs: debootstrap, unshare (util-linux), GNU tar, e2fsprogs, network access to
the Debian mirror and PyPI (only while building), and the repository's .venv (pip, ansible-playbook).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

try:
    from vmtest.buildcache import load_manifest, locked
except ImportError:  # run as a script (scripts/build-*.sh): tools/ is not on sys.path then
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from vmtest.buildcache import load_manifest, locked

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
COLLECTION = REPO / "collections/ansible_collections/kubeos/os"
AGENT_UNIT = REPO / "deploy/systemd/kubeos-agent.service"
DEFAULT_CACHE = "/var/cache/kubeos/nodeos"
CACHE_ENV = "KUBEOS_NODEOS_CACHE"
MIRROR_ENV = "KUBEOS_NODEOS_MIRROR"
SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
# Bump when the base stage changes in a way its other inputs do not show.
BASE_RECIPE = 2
# Installed into the debootstrap'ed minbase (which already has tar, gzip, findutils, ...).
PACKAGES = (
    "systemd",
    "systemd-sysv",
    "udev",
    "kmod",
    "initramfs-tools",
    "linux-image-amd64",
    "python3",
    "python3-venv",
    "util-linux",
    "mount",
    "fdisk",
    "e2fsprogs",
    "dosfstools",
    "mtools",
)
# Python distributions of pyproject.toml's dependencies that only os-operator/os-proxy use (the node gets the
# rest; the build checks that the agent imports). pyproject.toml has no separate agent extra to use instead.
NOT_ON_THE_NODE = ("kubernetes", "kopf", "prometheus-client")
VENV = "/opt/kubeos/venv"
COLLECTION_DEST = "usr/share/ansible/collections/ansible_collections/kubeos/os"
# Units enabled in the node OS, and units masked (consoles, timers, updates a read-only root cannot take).
ENABLE = ("kubeos-agent.service", "kubeos-health.service", "kubeos-test-driver.service")
MASK = (
    "serial-getty@ttyS0.service",
    "getty@tty1.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "fstrim.timer",
    "ldconfig.service",
    "systemd-update-done.service",
    "systemd-firstboot.service",
    "systemd-hwdb-update.service",
)
VERSIONS = ("v1", "v2")
# Node builds kept in out/ (see prune_outputs).
KEEP_BUILDS = 2
KEEP_UNUSED_SECONDS = 3600
MIB = 1024 * 1024

Log = Callable[[str], None]


class BuildError(Exception):
    """The node OS cannot be built."""


def cache_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    return Path(explicit or os.environ.get(CACHE_ENV) or DEFAULT_CACHE)


def run(argv: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    res = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False, env=env)
    if res.returncode != 0:
        tail = "\n".join((res.stdout + res.stderr).splitlines()[-60:])
        raise BuildError(f"{shlex.join(argv)} failed ({res.returncode}):\n{tail}")
    return res.stdout


def _files(root: Path, *, skip_dirs: Iterable[str] = ()) -> list[Path]:
    skip = {"__pycache__", *skip_dirs}
    out = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).parts
        if any(part in skip for part in rel) or path.suffix in (".pyc", ".pyo") or path.name.endswith(".tar.gz"):
            continue
        if path.is_file():
            out.append(path)
    return out


def _digest_files(digest: Any, root: Path, files: Iterable[Path]) -> None:
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")


# --- inputs -----------------------------------------------------------------------------------------------------


def requirements() -> list[str]:
    """The agent's Python requirements: pyproject.toml's dependencies without the operator's."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    out = []
    for spec in project["dependencies"]:
        name = re.split(r"[<>=!~;\[ ]", spec, maxsplit=1)[0].strip().lower().replace("_", "-")
        if name not in NOT_ON_THE_NODE:
            out.append(spec)
    return out


def base_stamp() -> str:
    digest = hashlib.sha256()
    digest.update(
        json.dumps(
            {"recipe": BASE_RECIPE, "suite": SUITE, "packages": PACKAGES, "requirements": requirements()},
            sort_keys=True,
        ).encode()
    )
    digest.update((HERE / "base-setup.sh").read_bytes())
    return digest.hexdigest()


def collection_files() -> list[Path]:
    return _files(COLLECTION, skip_dirs=("tests",))


def node_stamp(base: str) -> str:
    """Over the base stamp and everything of the repository that ends up in the node OS."""
    digest = hashlib.sha256(base.encode())
    # This builder and what it installs; vm.py runs on the host only.
    _digest_files(digest, HERE, [HERE / "build.py", *_files(HERE / "rootfs")])
    _digest_files(digest, REPO, _files(REPO / "agent"))
    _digest_files(digest, REPO, [REPO / "pyproject.toml", AGENT_UNIT])
    _digest_files(digest, COLLECTION, collection_files())
    return digest.hexdigest()


def mirror() -> str:
    """The Debian mirror apt uses here (deb822 .sources or one-line .list), or $KUBEOS_NODEOS_MIRROR."""
    explicit = os.environ.get(MIRROR_ENV)
    if explicit:
        return explicit
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in sources:
        if path.suffix not in (".list", ".sources") or not path.is_file():
            continue
        text = path.read_text(errors="replace")
        if path.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields = dict(
                    (key.strip().lower(), value.strip())
                    for key, _, value in (line.partition(":") for line in stanza.splitlines())
                    if not key.startswith("#") and value
                )
                uris = fields.get("uris", "").split()
                if SUITE in fields.get("suites", "").split() and "deb" in fields.get("types", "").split() and uris:
                    return str(uris[0])
        else:
            for line in text.splitlines():
                words = re.sub(r"\[[^]]*\]", "", line).split()
                if len(words) >= 3 and words[0] == "deb" and words[2] == SUITE:
                    return words[1]
    return DEFAULT_MIRROR


# --- namespaces and chroots ---------------------------------------------------------------------------------------


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve())
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8") as handle:
        for line in handle:
            point = line.split()[4].replace("\\040", " ")
            if point == prefix or point.startswith(prefix + "/"):
                found.append(point)
    return found


def isolated(argv: list[str], *, env: dict[str, str] | None = None) -> str:
    """Run ``argv`` in its own mount and PID namespace: its mounts and processes end with it."""
    return run(["unshare", "--mount", "--pid", "--fork", "--propagation", "private", *argv], env=env)


def in_chroot(
    tree: Path, script: str, *, binds: dict[str, Path] | None = None, env: dict[str, str] | None = None
) -> str:
    """Run a shell script inside ``tree`` with /proc, /sys and /dev, isolated (see ``isolated``).

    ``binds`` maps paths inside the root to host directories bound there for the duration.
    """
    mounts = [
        'mount -t proc proc "$T/proc"',
        'mount -t sysfs sysfs "$T/sys"',
        'mount --rbind /dev "$T/dev"',
    ]
    for inside, host in (binds or {}).items():
        mounts.append(f'mkdir -p "$T{inside}" && mount --bind {shlex.quote(str(host))} "$T{inside}"')
    outer = "set -e\n" + "\n".join(mounts) + '\nexec chroot "$T" /bin/sh -c "$KUBEOS_SCRIPT"\n'
    full_env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "LC_ALL": "C.UTF-8",
        "HOME": "/root",
        **(env or {}),
        "T": str(tree),
        "KUBEOS_SCRIPT": script,
    }
    try:
        return isolated(["/bin/sh", "-c", outer], env=full_env)
    finally:
        left = _mounts_under(tree)
        if left:  # pragma: no cover - the namespace makes this impossible
            raise BuildError(f"mounts left under {tree}: {left}")


def _swap_in(stage: Path, final: Path) -> None:
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(stage, final)
    if old.exists():
        shutil.rmtree(old)


def _tar_create(tree: Path, out: Path) -> None:
    run(
        [
            "tar",
            "--create",
            "--file",
            str(out),
            "--directory",
            str(tree),
            "--numeric-owner",
            "--xattrs",
            "--xattrs-include=*",
            "--acls",
            "--sort=name",
            "--one-file-system",
            ".",
        ]
    )


def _tar_extract(archive: Path, tree: Path) -> None:
    tree.mkdir(parents=True)
    run(
        [
            "tar",
            "--extract",
            "--file",
            str(archive),
            "--directory",
            str(tree),
            "--numeric-owner",
            "--same-owner",
            "--preserve-permissions",
            "--xattrs",
            "--xattrs-include=*",
            "--acls",
        ]
    )


def _dir_bytes(tree: Path) -> int:
    return int(run(["du", "-s", "--block-size=1", str(tree)]).split()[0])


# --- stage 1: base ------------------------------------------------------------------------------------------------


def _host_python() -> Path:
    """A Python 3.11 with pip (the repository's .venv): pip download and the wheel build run with it."""
    for candidate in (REPO / ".venv/bin/python", Path(sys.executable)):
        if candidate.exists():
            probe = subprocess.run(
                [str(candidate), "-c", "import sys, pip; print(sys.version_info[:2] == (3, 11))"],
                capture_output=True,
                text=True,
                check=False,
            )
            if probe.stdout.strip() == "True":
                return candidate
    raise BuildError("no Python 3.11 with pip found (the node's python3 is 3.11): run scripts/setup.sh")


def _pip(python: Path, *args: str) -> str:
    argv = [str(python), "-m", "pip", "--disable-pip-version-check", *args]
    if Path("/etc/ssl/certs/ca-certificates.crt").is_file():
        argv[4:4] = ["--cert", "/etc/ssl/certs/ca-certificates.crt"]
    return run(argv)


def download_wheels(wheels: Path, reqs: list[str], log: Log) -> None:
    wheels.mkdir(parents=True, exist_ok=True)
    log(f"pip download {' '.join(reqs)}")
    _pip(_host_python(), "download", "--quiet", "--only-binary=:all:", "--dest", str(wheels), *reqs)


def build_base(cache: Path, out: Path, stamp: str, log: Log) -> dict[str, Any]:
    started = time.monotonic()
    for tool in ("debootstrap", "unshare", "chroot", "tar"):
        if not shutil.which(tool):
            raise BuildError(f"{tool} is missing: install the Debian packages debootstrap, util-linux, coreutils, tar")
    work = Path(tempfile.mkdtemp(prefix="base.", dir=cache))
    try:
        tree = work / "rootfs"
        debs = cache / "debs"
        (debs / "partial").mkdir(parents=True, exist_ok=True)
        source = mirror()
        log(f"debootstrap --variant=minbase {SUITE} from {source}")
        t0 = time.monotonic()
        isolated(
            [
                "debootstrap",
                "--variant=minbase",
                f"--cache-dir={debs}",
                "--merged-usr",
                SUITE,
                str(tree),
                source,
            ]
        )
        log(f"debootstrap done in {time.monotonic() - t0:.0f} s")
        reqs = requirements()
        download_wheels(cache / "wheels", reqs, log)
        (tree / "tmp/kubeos-wheels").mkdir(parents=True)
        for wheel in (cache / "wheels").glob("*.whl"):
            shutil.copy2(wheel, tree / "tmp/kubeos-wheels" / wheel.name)
        (tree / "tmp/kubeos-requirements.txt").write_text("".join(f"{r}\n" for r in reqs))
        shutil.copy2(HERE / "base-setup.sh", tree / "tmp/base-setup.sh")
        log(f"base setup in the chroot: {' '.join(PACKAGES)}")
        t0 = time.monotonic()
        output = in_chroot(
            tree,
            "/bin/sh /tmp/base-setup.sh",
            binds={"/var/cache/apt/archives": debs},
            env={
                "KUBEOS_PACKAGES": " ".join(PACKAGES),
                "KUBEOS_WHEELS": "/tmp/kubeos-wheels",
                "KUBEOS_REQUIREMENTS": "/tmp/kubeos-requirements.txt",
            },
        )
        for line in output.splitlines():
            if line.startswith("base-setup:"):
                log(line)
        log(f"base setup done in {time.monotonic() - t0:.0f} s")
        shutil.rmtree(tree / "tmp")
        (tree / "tmp").mkdir(mode=0o1777)
        os.chmod(tree / "tmp", 0o1777)
        # debootstrap leaves its packages in the root too (apt's own directory, hidden by the bind meanwhile).
        archives = tree / "var/cache/apt/archives"
        for deb in archives.glob("*.deb"):
            deb.unlink()
        shutil.rmtree(archives / "partial", ignore_errors=True)
        kvers = sorted(p.name for p in (tree / "usr/lib/modules").iterdir())
        if len(kvers) != 1:
            raise BuildError(f"expected one kernel in the base, found {kvers}")
        stage = work / "out"
        stage.mkdir()
        python_packages = (tree / "opt/kubeos/base-requirements.txt").read_text().split()
        debian_packages = (tree / "opt/kubeos/base-packages.txt").read_text().splitlines()
        size = _dir_bytes(tree)
        log(f"tar of the base ({size / MIB:.0f} MiB)")
        _tar_create(tree, stage / "rootfs.tar")
        manifest = {
            "stamp": stamp,
            "suite": SUITE,
            "mirror": source,
            "kernel_version": kvers[0],
            "tree_bytes": size,
            "debian_packages": len(debian_packages),
            "python_packages": python_packages,
            "files": {"rootfs": {"name": "rootfs.tar", "size": (stage / "rootfs.tar").stat().st_size}},
            "build_seconds": round(time.monotonic() - started, 1),
        }
        (stage / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        _swap_in(stage, out)
        return manifest
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --- stage 2: the node OS and its payloads -------------------------------------------------------------------------


def build_wheel(work: Path, log: Log) -> Path:
    """The kubeos wheel, built from a copy of the sources (a build in place would write into the repository)."""
    src = work / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (REPO / name).exists():
            shutil.copy2(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("agent", "operator"):
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=ignore)
    dest = work / "wheel"
    log("pip wheel kubeos")
    _pip(_host_python(), "wheel", "--quiet", "--no-deps", "--wheel-dir", str(dest), str(src))
    wheels = sorted(dest.glob("kubeos-*.whl"))
    if len(wheels) != 1:
        raise BuildError(f"pip wheel made {[w.name for w in dest.iterdir()]}, expected one kubeos wheel")
    return wheels[0]


def install_repository_parts(tree: Path, wheel: Path, log: Log) -> None:
    # The agent.
    (tree / "tmp" / wheel.name).write_bytes(wheel.read_bytes())
    log(f"install {wheel.name} into {VENV}")
    in_chroot(
        tree,
        f"{VENV}/bin/python -m pip install -q --no-index --no-deps --no-cache-dir --disable-pip-version-check "
        f"/tmp/{wheel.name} && rm -f /tmp/{wheel.name} && "
        # pip is done (nothing is installed on the node at run time), ansible-test is not for nodes.
        f"rm -rf {VENV}/lib/python3*/site-packages/pip {VENV}/lib/python3*/site-packages/pip-*.dist-info "
        f"{VENV}/lib/python3*/site-packages/ansible_test {VENV}/bin/pip {VENV}/bin/pip3* {VENV}/bin/ansible-test",
    )
    # The collection (a copy of the repository's, without its tests).
    dest = tree / COLLECTION_DEST
    for path in collection_files():
        target = dest / path.relative_to(COLLECTION)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    # The agent's unit, then this directory's files.
    shutil.copyfile(AGENT_UNIT, tree / "etc/systemd/system/kubeos-agent.service")
    overlay = HERE / "rootfs"
    for path in _files(overlay):
        target = tree / path.relative_to(overlay)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        os.chmod(target, 0o755 if os.access(path, os.X_OK) else 0o644)
    (tree / "persist").mkdir(exist_ok=True)
    (tree / "etc/hostname").write_text("kubeos-node\n")
    (tree / "etc/hosts").write_text("127.0.0.1\tlocalhost\n127.0.1.1\tkubeos-node\n::1\tlocalhost ip6-localhost\n")
    log("enable the units, check that the agent imports")
    in_chroot(
        tree,
        f"systemctl enable --quiet {' '.join(ENABLE)} && systemctl mask --quiet {' '.join(MASK)} && "
        f"{VENV}/bin/kubeos-agent --version && "
        f'{VENV}/bin/python -c \'import sys; sys.path.insert(0, "/usr/share/ansible/collections"); '
        "import ansible_runner, kubeos_agent.service, kubeos_agent.ctl' && "
        f"{VENV}/bin/ansible-playbook --version >/dev/null",
    )


def write_os_release(tree: Path, version: str, base_manifest: dict[str, Any]) -> None:
    target = tree / "usr/lib/os-release"
    target.unlink(missing_ok=True)
    target.write_text(
        'NAME="KubeOS node"\n'
        "ID=kubeos-node\n"
        "ID_LIKE=debian\n"
        f"VERSION_ID={version}\n"
        f'VERSION="{version} (Debian {SUITE})"\n'
        f'PRETTY_NAME="KubeOS node {version}"\n'
        f"KUBEOS_KERNEL={base_manifest['kernel_version']}\n"
    )
    link = tree / "etc/os-release"
    link.unlink(missing_ok=True)
    link.symlink_to("../usr/lib/os-release")


def build_payload(tree: Path, stage: Path, version: str, work: Path, log: Log) -> dict[str, Any]:
    """``playbooks/build_image.yml`` with disk=false: the collection's image_payload module."""
    name = f"node-{version}"
    playbook = Path(_host_python()).parent / "ansible-playbook"
    env = {
        **os.environ,
        "ANSIBLE_COLLECTIONS_PATH": str(REPO / "collections"),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_LOCALHOST_WARNING": "False",
        "ANSIBLE_INVENTORY_UNPARSED_WARNING": "False",
        "ANSIBLE_HOME": str(work / "ansible-home"),
    }
    log(f"payload {name} (playbooks/build_image.yml, disk=false)")
    run(
        [
            str(playbook),
            str(REPO / "playbooks/build_image.yml"),
            "-e",
            f"rootfs={tree}",
            "-e",
            f"output_dir={stage}",
            "-e",
            f"name={name}",
            "-e",
            "disk=false",
        ],
        env=env,
    )
    manifest: dict[str, Any] = json.loads((stage / f"{name}.json").read_text())
    if manifest.get("version") != version:
        raise BuildError(f"payload {name} records version {manifest.get('version')!r}, not {version}")
    return manifest


def build_node(cache: Path, out: Path, stamp: str, base_manifest: dict[str, Any], log: Log) -> dict[str, Any]:
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="node.", dir=cache))
    try:
        tree = work / "rootfs"
        log("unpack the base")
        _tar_extract(cache / "base" / base_manifest["files"]["rootfs"]["name"], tree)
        wheel = build_wheel(work, log)
        install_repository_parts(tree, wheel, log)
        stage = work / "out"
        stage.mkdir()
        files: dict[str, dict[str, Any]] = {}
        payloads: dict[str, dict[str, Any]] = {}
        for version in VERSIONS:
            write_os_release(tree, version, base_manifest)
            payload = build_payload(tree, stage, version, work, log)
            payloads[version] = {
                "image": payload["file"],
                "manifest": f"node-{version}.json",
                "sha256": payload["sha256"],
                "size": payload["size"],
                "pretty_name": payload["os_release"].get("PRETTY_NAME", ""),
            }
            files[f"node-{version}.ext4"] = {"name": payload["file"], "size": payload["size"]}
            files[f"node-{version}.json"] = {
                "name": f"node-{version}.json",
                "size": (stage / f"node-{version}.json").stat().st_size,
            }
        manifest = {
            "stamp": stamp,
            "base_stamp": base_manifest["stamp"],
            "kernel_version": base_manifest["kernel_version"],
            "wheel": wheel.name,
            "tree_bytes": _dir_bytes(tree),
            "versions": payloads,
            "files": files,
            "build_seconds": round(time.monotonic() - started, 1),
        }
        (stage / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        _swap_in(stage, out)
        return manifest
    finally:
        shutil.rmtree(work, ignore_errors=True)


def prune_outputs(outputs: Path, *, keep: Path, log: Log) -> None:
    """Node builds are kept per stamp (``out/<stamp>``), so that test runs of different checkouts sharing the
    cache do not pull the payloads from under each other. Beyond the ``KEEP_BUILDS`` used last, builds unused
    for ``KEEP_UNUSED_SECONDS`` are removed."""
    builds = sorted(
        (d for d in outputs.iterdir() if d.is_dir() and d != keep), key=lambda d: d.stat().st_mtime, reverse=True
    )
    now = time.time()
    for directory in builds[KEEP_BUILDS - 1 :]:
        if now - directory.stat().st_mtime > KEEP_UNUSED_SECONDS:
            log(f"removing the old build {directory}")
            shutil.rmtree(directory, ignore_errors=True)


def ensure(
    cache: str | os.PathLike[str] | None = None,
    *,
    force: bool = False,
    force_base: bool = False,
    log: Log | None = None,
) -> dict[str, Any]:
    """Build what is missing or out of date; return the node manifest with ``dir`` and absolute ``paths``.

    ``paths`` maps ``node-vN.ext4`` / ``node-vN.json`` to files under ``dir`` (never modify them).
    """
    say: Log = log or (lambda msg: print(f"nodeos: {msg}", flush=True))
    root = cache_dir(cache)
    if os.geteuid() != 0:
        raise BuildError("building the node OS needs root (debootstrap, chroot, mkfs)")
    with locked(root):
        the_base_stamp = base_stamp()
        base = None if force_base else load_manifest(root / "base", the_base_stamp)
        if base is None:
            say(f"building the base into {root / 'base'} (stamp {the_base_stamp[:12]})")
            base = build_base(root, root / "base", the_base_stamp, say)
            say(f"base done in {base['build_seconds']} s")
        else:
            say(f"base up to date (stamp {the_base_stamp[:12]}, kernel {base['kernel_version']})")
        the_stamp = node_stamp(the_base_stamp)
        out = root / "out" / the_stamp[:16]
        manifest = None if (force or force_base) else load_manifest(out, the_stamp)
        if manifest is None:
            say(f"building the node OS into {out}")
            out.parent.mkdir(exist_ok=True)
            manifest = build_node(root, out, the_stamp, base, say)
            say(f"node OS done in {manifest['build_seconds']} s")
        else:
            say(f"node OS up to date in {out}")
        os.utime(out)  # last used: pruning keeps what was used lately
        prune_outputs(root / "out", keep=out, log=say)
    manifest["dir"] = str(out)
    manifest["paths"] = {key: str(out / entry["name"]) for key, entry in manifest["files"].items()}
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--cache", help=f"cache directory (default ${CACHE_ENV} or {DEFAULT_CACHE})")
    parser.add_argument("--force", action="store_true", help="rebuild the node stage even when it is up to date")
    parser.add_argument("--force-base", action="store_true", help="rebuild both stages, debootstrap included")
    parser.add_argument("--print-manifest", action="store_true", help="print the node manifest as JSON at the end")
    args = parser.parse_args(argv)
    try:
        manifest = ensure(args.cache, force=args.force, force_base=args.force_base)
    except BuildError as exc:
        print(f"nodeos: ERROR: {exc}", file=sys.stderr)
        return 1
    if args.print_manifest:
        print(json.dumps(manifest, indent=2))
    else:
        for version, entry in manifest["versions"].items():
            print(f"nodeos: {version}: {manifest['paths'][f'node-{version}.ext4']} ({entry['size'] / MIB:.0f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
