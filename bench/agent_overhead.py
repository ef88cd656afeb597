#!/usr/bin/env python3
"""Benchmark the os-agent's overhead: one ``prepare_upgrade`` through the agent against calling
``module_utils.slotwrite.write_slot`` directly on the same disk image.

Run as root from the repository root::

    .venv/bin/python bench/agent_overhead.py [--size-mib 256] [--runs 3] [--settle 2] [--no-drop-caches]

Set-up (untimed), in a temporary directory under /var/tmp that is removed at the end: an OS payload
(ext4 image of ``--size-mib`` MiB with an os-release, a kernel file and random data, ``mkfs.ext4 -d``),
a disk image provisioned by the real ``kubeos.os.provision`` role (slot A committed, slot B empty), and
the real daemon (``python -m kubeos_agent.daemon``) configured for a copy of that disk.

Each run starts from a fresh copy of the provisioned disk and, unless ``--no-drop-caches``, from cold
caches (``sync; echo 3 > /proc/sys/vm/drop_caches`` then ``--settle`` seconds). Interleaved:

- **direct**: a child process opens the disk (loop device) and calls ``slotwrite.write_slot`` for
  ``file://PAYLOAD`` into slot B; its time is measured inside the child around that call (interpreter
  start-up excluded: the baseline is the module's logic, not Python);
- **agent**: ``POST /v1/operations`` (``prepare_upgrade``) on the agent's socket, then ``GET`` every 20 ms
  until it ended. *First byte*: the bench polls the disk image file where slot B's ext4 superblock lands
  (offset 1024 of the partition) until it is no longer zero. *Total*: request until the operation is
  reported ``succeeded``.

Output: per-run times, medians, and ``overhead = agent total - direct``. The last line is
``overhead_s <median overhead in seconds>``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
COLLECTIONS = REPO / "collections"
sys.path.insert(0, str(COLLECTIONS))
sys.path.insert(0, str(REPO / "tests"))

MIB = 1024 * 1024


def run(argv: list[str]) -> str:
    return subprocess.run(argv, check=True, text=True, capture_output=True).stdout


def drop_caches(settle: float) -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
    time.sleep(settle)


def make_payload(work: Path, size_mib: int) -> tuple[Path, str]:
    from support.osimage import file_sha256, make_os_tree

    tree = make_os_tree(work / "tree", "2.0")
    left = int(size_mib * MIB * 0.8)
    (tree / "var").mkdir(exist_ok=True)
    with open(tree / "var" / "filler", "wb") as handle:
        while left:
            n = min(left, 4 * MIB)
            handle.write(os.urandom(n))
            left -= n
    payload = work / "os-2.0.ext4"
    run(
        [
            "mkfs.ext4",
            "-q",
            "-F",
            "-O",
            "^metadata_csum_seed,^orphan_file",
            "-d",
            str(tree),
            str(payload),
            f"{size_mib}M",
        ]
    )
    shutil.rmtree(tree)
    return payload, file_sha256(payload)


def provision(work: Path, disk: Path, root_mib: int) -> None:
    """Lay out and provision ``disk`` with the real role (slot A: a small OS 1.0, committed)."""
    import ansible_runner
    import yaml
    from support.osimage import make_ext4_image, make_os_tree

    v1 = work / "os-1.0.ext4"
    v1_sha = make_ext4_image(make_os_tree(work / "tree-1.0", "1.0"), v1, size_mib=24)
    data = work / "provision"
    (data / "project").mkdir(parents=True)
    role = {
        "role": "kubeos.os.provision",
        "kubeos_provision_device": str(disk),
        "kubeos_provision_root_size": f"{root_mib}MiB",
        "kubeos_provision_image_src": f"file://{v1}",
        "kubeos_provision_image_sha256": v1_sha,
    }
    (data / "project" / "play.yml").write_text(
        yaml.safe_dump([{"hosts": "localhost", "gather_facts": False, "roles": [role]}])
    )
    result = ansible_runner.run(
        private_data_dir=str(data),
        playbook="play.yml",
        inventory={
            "all": {
                "hosts": {"localhost": {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}}
            }
        },
        envvars={
            "ANSIBLE_COLLECTIONS_PATH": str(COLLECTIONS),
            "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        },
        quiet=True,
    )
    if result.status != "successful":
        raise SystemExit(f"provisioning the bench disk failed:\n{result.stdout.read()}")


def slot_b(disk: Path) -> dict[str, Any]:
    table = json.loads(run(["sfdisk", "--json", str(disk)]))["partitiontable"]
    sector = int(table.get("sectorsize", 512))
    for part in table["partitions"]:
        if part["name"] == "ROOT-B":
            return {"start": part["start"] * sector, "size": part["size"] * sector}
    raise SystemExit("no ROOT-B on the bench disk")


def partuuid_a(disk: Path) -> str:
    table = json.loads(run(["sfdisk", "--json", str(disk)]))["partitiontable"]
    return str(next(p["uuid"].lower() for p in table["partitions"] if p["name"] == "ROOT-A"))


def fresh_copy(template: Path, target: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        target.unlink()
    run(["cp", "--sparse=always", str(template), str(target)])


# --- direct ------------------------------------------------------------------------------------------------


def child_direct(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--disk", required=True)
    p.add_argument("--payload", required=True)
    p.add_argument("--sha256", required=True)
    p.add_argument("--running-root", required=True)
    args = p.parse_args(argv)
    from ansible_collections.kubeos.os.plugins.module_utils import fetch, slots, slotwrite

    request = slotwrite.WriteRequest(source=fetch.SourceOptions(url=f"file://{args.payload}"), sha256=args.sha256)
    started = time.perf_counter()
    with slots.open_disk(args.disk, args.running_root) as disk:
        outcome = slotwrite.write_slot(disk, request, running_root=args.running_root)
    seconds = time.perf_counter() - started
    print(json.dumps({"seconds": seconds, "slot": outcome.slot, "bytes": outcome.bytes_written}))
    return 0


def time_direct(disk: Path, payload: Path, sha: str, running_root: str) -> float:
    out = run(
        [sys.executable, __file__, "--child-direct", "--disk", str(disk), "--payload", str(payload),
         "--sha256", sha, "--running-root", running_root]
    )  # fmt: skip
    result = json.loads(out.strip().splitlines()[-1])
    assert result["slot"] == "B", result
    return float(result["seconds"])


# --- agent -------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def agent(work: Path, disk: Path, running_root: str) -> Iterator[Any]:
    import yaml

    from kubeos_agent.client import AgentClient, AgentUnreachable

    socket_path = work / "run" / "agent.sock"
    config: dict[str, Any] = {
        "socket_path": str(socket_path),
        "journal_dir": str(work / "persist" / "journal"),
        "artifacts_dir": str(work / "persist" / "runner"),
        "runtime_dir": str(work / "run"),
        "cert_dir": str(work / "certs"),
        "collections_path": str(COLLECTIONS),
        "device": str(disk),
        "running_root": running_root,
        "reboot_command": ["true"],
        "log_level": "warning",
    }
    (work / "agent.yaml").write_text(yaml.safe_dump(config))
    log = open(work / "agent.log", "wb")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(
        [sys.executable, "-m", "kubeos_agent.daemon", "--config", str(work / "agent.yaml")], stdout=log, stderr=log
    )
    client = AgentClient(socket_path, timeout=60)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                client.operations()
                break
            except AgentUnreachable:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the agent did not start:\n{(work / 'agent.log').read_text()}") from None
                time.sleep(0.05)
        yield client
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()


def read_at(path: Path, offset: int, size: int = 1024) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


def time_agent(client: Any, disk: Path, slot: dict[str, Any], payload: Path, sha: str) -> tuple[float, float]:
    # The payload's ext4 superblock (bytes 1024..2047, unique UUID) lands at that offset of slot B with the
    # first chunk written.
    superblock = read_at(payload, 1024)
    assert read_at(disk, slot["start"] + 1024) != superblock, "slot B already holds the payload"

    def first_block_written() -> bool:
        return read_at(disk, slot["start"] + 1024) == superblock

    started = time.perf_counter()
    resp = client.start("prepare_upgrade", imageurl=f"file://{payload}", checksum=sha)
    if resp.status != 202:
        raise SystemExit(f"the agent refused the request: {resp.body}")
    op_id = resp.operation["id"]
    first: float | None = None
    while True:
        if first is None and first_block_written():
            first = time.perf_counter() - started
        op = client.get(op_id).operation
        if op["state"] not in ("queued", "running"):
            break
        time.sleep(0.02)
    total = time.perf_counter() - started
    if op["state"] != "succeeded":
        raise SystemExit(f"prepare_upgrade {op['state']}: {op['error']}")
    return (first if first is not None else total), total


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child-direct":
        return child_direct(sys.argv[2:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-mib", type=int, default=256, help="size of the OS payload (default 256)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--settle", type=float, default=2.0, help="seconds to wait after dropping caches")
    p.add_argument("--no-drop-caches", action="store_true")
    args = p.parse_args()
    if os.geteuid() != 0:
        print("run as root: the benchmark needs loop devices (and drop_caches)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="kubeos-bench-agent-", dir="/var/tmp"))
    try:
        print(f"payload: {args.size_mib} MiB ext4; building the payload and provisioning the disk ...", flush=True)
        payload, sha = make_payload(work, args.size_mib)
        template = work / "template.img"
        root_mib = args.size_mib + 64
        with open(template, "wb") as handle:
            handle.truncate((64 + 64 + 2 * root_mib + 128) * MIB)
        provision(work, template, root_mib)
        slot = slot_b(template)
        running_root = f"PARTUUID={partuuid_a(template)}"
        disk = work / "disk.img"
        fresh_copy(template, disk)
        direct: list[float] = []
        first_bytes: list[float] = []
        totals: list[float] = []
        with agent(work, disk, running_root) as client:
            for i in range(args.runs):
                fresh_copy(template, disk)
                if not args.no_drop_caches:
                    drop_caches(args.settle)
                direct.append(time_direct(disk, payload, sha, running_root))
                fresh_copy(template, disk)
                if not args.no_drop_caches:
                    drop_caches(args.settle)
                first, total = time_agent(client, disk, slot, payload, sha)
                first_bytes.append(first)
                totals.append(total)
                print(
                    f"run {i + 1}: direct write_slot {direct[-1]:.2f} s | agent: first byte {first:.2f} s, "
                    f"total {total:.2f} s, overhead {total - direct[-1]:.2f} s",
                    flush=True,
                )
        overheads = [t - d for t, d in zip(totals, direct, strict=True)]
        print(f"median direct write_slot      {statistics.median(direct):.2f} s")
        print(f"median agent request->first byte {statistics.median(first_bytes):.2f} s")
        print(f"median agent total            {statistics.median(totals):.2f} s")
        print(f"overhead_s {statistics.median(overheads):.2f}")
    finally:
        for line in run(
            ["losetup", "--associated", str(work / "disk.img"), "--noheadings", "--output", "NAME"]
        ).split():
            subprocess.run(["losetup", "--detach", line], check=False)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
