"""Shared fixtures: image files the tests create, loop devices they attach, and real module runs.

Session fixtures used by more than one directory live here, defined once: ``images`` (node disk templates
for the agent and cluster tests) and, from tests/cluster/fixtures.py, ``apiserver_cluster``, ``cluster``
and ``deployed`` (one etcd + kube-apiserver per run).

Every disk a test touches is a sparse image file under the test's own temporary directory.
Loop devices attached over those files are detached in ``finally`` blocks, even when the
module under test failed half-way.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from cluster.fixtures import apiserver_cluster, cluster, deployed
from support.osimage import make_ext4_image, make_os_tree

REPO = Path(__file__).resolve().parent.parent
COLLECTIONS = REPO / "collections"
sys.path.insert(0, str(COLLECTIONS))
# ansible-runner finds ansible-playbook on PATH: make it the one of this interpreter's virtualenv.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"

MIB = 1024 * 1024

__all__ = ["apiserver_cluster", "cluster", "deployed"]  # fixtures, registered here once


def _require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (loop devices, mkfs, mount)")


def loop_devices_of(path: Path) -> list[str]:
    """Loop devices currently attached over ``path``."""
    res = subprocess.run(
        ["losetup", "--associated", str(path), "--noheadings", "--output", "NAME"],
        capture_output=True,
        text=True,
        check=False,
    )
    return [line.strip() for line in res.stdout.splitlines() if line.strip()]


def detach_all(path: Path) -> None:
    for device in loop_devices_of(path):
        subprocess.run(["umount", "--recursive", "--quiet", device], check=False)
        subprocess.run(["losetup", "--detach", device], check=False)


@pytest.fixture
def image_file(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """Make sparse image files; whatever stays attached over them is detached afterwards."""
    _require_root()
    made: list[Path] = []

    def make(name: str = "disk.img", size_mib: int = 1536) -> Path:
        path = tmp_path / name
        with open(path, "wb") as handle:
            handle.truncate(size_mib * MIB)
        made.append(path)
        return path

    try:
        yield make
    finally:
        for path in made:
            detach_all(path)


@dataclass
class ModuleResult:
    """The outcome of one real module run through ansible-runner."""

    status: str  # "ok", "changed" or "failed"
    result: dict[str, Any] = field(default_factory=dict)
    stdout: str = ""

    @property
    def failed(self) -> bool:
        return self.status == "failed"

    @property
    def changed(self) -> bool:
        return bool(self.result.get("changed"))

    @property
    def msg(self) -> str:
        return str(self.result.get("msg", ""))


def _runner_env() -> dict[str, str]:
    return {
        "ANSIBLE_COLLECTIONS_PATH": str(COLLECTIONS),
        "ANSIBLE_COLLECTIONS_SCAN_SYS_PATH": "False",
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_RETRY_FILES_ENABLED": "False",
        "ANSIBLE_LOCALHOST_WARNING": "False",
        "ANSIBLE_INVENTORY_UNPARSED_WARNING": "False",
    }


def run_playbook(
    workdir: Path,
    plays: list[dict[str, Any]],
    *,
    check: bool = False,
    diff: bool = False,
    extravars: dict[str, Any] | None = None,
) -> tuple[str, list[dict[str, Any]], str]:
    """Run ``plays`` with the real ansible-runner, connection local; return (status, task events, stdout)."""
    import ansible_runner

    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "project").mkdir(exist_ok=True)
    (workdir / "project" / "play.yml").write_text(yaml.safe_dump(plays, sort_keys=False))
    inventory = {
        "all": {
            "hosts": {
                "localhost": {
                    "ansible_connection": "local",
                    "ansible_python_interpreter": sys.executable,
                }
            }
        }
    }
    cmdline = []
    if check:
        cmdline.append("--check")
    if diff:
        cmdline.append("--diff")
    runner = ansible_runner.run(
        private_data_dir=str(workdir),
        playbook="play.yml",
        inventory=inventory,
        envvars=_runner_env(),
        extravars=extravars or {},
        cmdline=" ".join(cmdline) or None,
        quiet=True,
        rotate_artifacts=1,
    )
    events = [
        {**ev["event_data"], "event": ev["event"]}
        for ev in runner.events
        if ev.get("event") in ("runner_on_ok", "runner_on_failed") and "res" in ev.get("event_data", {})
    ]
    stdout = runner.stdout.read() if runner.stdout else ""
    return runner.status, events, stdout


def run_module_once(
    workdir: Path, name: str, args: dict[str, Any], *, check: bool = False, diff: bool = False
) -> ModuleResult:
    """Run one module of the collection by its FQCN, for real, through ansible-runner."""
    task = {"name": f"run {name}", name: args, "ignore_errors": True}
    plays = [{"hosts": "localhost", "gather_facts": False, "tasks": [task]}]
    _, events, stdout = run_playbook(workdir, plays, check=check, diff=diff)
    if not events:
        raise AssertionError(f"no task result from ansible-runner; output:\n{stdout}")
    res = events[-1]["res"]
    # ansible-core 2.19 leaves "failed" out of a failed task's result: the event says it.
    failed = bool(res.get("failed")) or events[-1]["event"] == "runner_on_failed"
    status = "failed" if failed else ("changed" if res.get("changed") else "ok")
    return ModuleResult(status=status, result=res, stdout=stdout)


@pytest.fixture
def run_module(tmp_path: Path) -> Callable[..., ModuleResult]:
    """``run_module(fqcn, args, check=False, diff=False)``: run_module_once in the test's own directory."""
    counter = iter(range(1_000_000))

    def run(name: str, args: dict[str, Any], *, check: bool = False, diff: bool = False) -> ModuleResult:
        return run_module_once(tmp_path / f"runner-{next(counter)}", name, args, check=check, diff=diff)

    return run


def copy_sparse(source: Path, target: Path) -> Path:
    """Copy an image file keeping it sparse (fast, small)."""
    subprocess.run(["cp", "--sparse=always", str(source), str(target)], check=True)
    return target


def sfdisk_json(device: str) -> dict[str, Any]:
    out = subprocess.run(["sfdisk", "--json", device], capture_output=True, text=True, check=True).stdout
    return json.loads(out)["partitiontable"]  # type: ignore[no-any-return]


def blkid(device: str) -> dict[str, str]:
    out = subprocess.run(
        ["blkid", "--probe", "--output", "export", device], capture_output=True, text=True, check=False
    ).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def sha256_of(path: str, *, size: int | None = None) -> str:
    """Hash a device or file (the first ``size`` bytes when given)."""
    import hashlib

    digest = hashlib.sha256()
    left = size
    with open(path, "rb") as handle:
        while left is None or left > 0:
            chunk = handle.read(4 * MIB if left is None else min(4 * MIB, left))
            if not chunk:
                break
            digest.update(chunk)
            if left is not None:
                left -= len(chunk)
    return digest.hexdigest()


def tree_listing(root: Path) -> dict[str, tuple[Any, ...]]:
    """What a root filesystem is made of, for comparing two of them: for every path but ``lost+found``, its type,
    mode, owner, link target, xattrs, content hash, the first path of its hard-link group and its device number;
    no times."""
    listing: dict[str, tuple[Any, ...]] = {}
    inodes: dict[int, str] = {}
    for directory, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = Path(directory) / name
            rel = str(path.relative_to(root))
            if rel == "lost+found":
                continue
            st = path.lstat()
            link = os.readlink(path) if stat.S_ISLNK(st.st_mode) else None
            xattrs = (
                {k: os.getxattr(path, k, follow_symlinks=False) for k in os.listxattr(path, follow_symlinks=False)}
                if not stat.S_ISLNK(st.st_mode)
                else {}
            )
            content = sha256_of(str(path)) if stat.S_ISREG(st.st_mode) else None
            hardlink_of = inodes.setdefault(st.st_ino, rel) if stat.S_ISREG(st.st_mode) and st.st_nlink > 1 else None
            rdev = st.st_rdev if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else None
            listing[rel] = (
                stat.S_IFMT(st.st_mode),
                stat.S_IMODE(st.st_mode),
                st.st_uid,
                st.st_gid,
                link,
                tuple(sorted(xattrs.items())),
                content,
                hardlink_of,
                rdev,
            )
    return listing


# --- node disk templates (agent and cluster tests) ------------------------------------------------------

# A node disk is laid out and provisioned once per session by the real ``kubeos.os.provision`` role (slot A:
# OS 1.0, committed; slot B empty), and once more with OS 2.0 written into slot B by the real
# ``kubeos.os.slot_write`` (the "prepared" template).
NODE_DISK_MIB = 320
NODE_ROOT_SIZE = "64MiB"


@dataclass(frozen=True)
class Images:
    base: Path
    fresh: Path  # A = 1.0 committed, B empty
    prepared: Path  # and B = 2.0 written (bootable, not armed)
    www: Path  # served directory: the upgrade payload
    v2: Path
    v2_sha256: str
    v1_sha256: str


def _must(workdir: Path, plays: list[dict[str, object]]) -> None:
    status, _events, stdout = run_playbook(workdir, plays)
    assert status == "successful", stdout


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Images]:
    if os.geteuid() != 0:
        pytest.skip("needs root (loop devices, mkfs, mount)")
    base = tmp_path_factory.mktemp("agent-images")
    www = base / "www"
    www.mkdir()
    v1 = base / "os-1.0.ext4"
    v1_sha = make_ext4_image(make_os_tree(base / "tree-1.0", "1.0"), v1, size_mib=24)
    v2 = www / "os-2.0.ext4"
    v2_sha = make_ext4_image(make_os_tree(base / "tree-2.0", "2.0"), v2, size_mib=32)
    fresh, prepared = base / "fresh.img", base / "prepared.img"
    with open(fresh, "wb") as handle:
        handle.truncate(NODE_DISK_MIB * MIB)
    try:
        role = {
            "kubeos_provision_device": str(fresh),
            "kubeos_provision_root_size": NODE_ROOT_SIZE,
            "kubeos_provision_image_src": f"file://{v1}",
            "kubeos_provision_image_sha256": v1_sha,
        }
        play = {"hosts": "localhost", "gather_facts": False, "roles": [{"role": "kubeos.os.provision", **role}]}
        _must(base / "provision", [play])
        subprocess.run(["cp", "--sparse=always", str(fresh), str(prepared)], check=True)
        write = {"device": str(prepared), "src": f"file://{v2}", "sha256": v2_sha}
        _must(
            base / "prepare",
            [{"hosts": "localhost", "gather_facts": False, "tasks": [{"kubeos.os.slot_write": write}]}],
        )
        yield Images(base, fresh, prepared, www, v2, v2_sha, v1_sha)
    finally:
        for image in (fresh, prepared):
            detach_all(image)
