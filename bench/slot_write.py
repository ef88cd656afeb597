#!/usr/bin/env python3
"""Benchmark kubeos.os slot writing (module_utils.imagewrite.write_raw) against dd + sha256sum.

Run as root from the repository root::

    .venv/bin/python bench/slot_write.py [--size-mib 1024] [--runs 3]

It builds an ext4 filesystem image filled with random files (``mkfs.ext4 -d``), attaches a loop
device over a slightly larger target file (everything in a temporary directory under /var/tmp), then
times, each run starting from cold caches (``sync; echo 3 > /proc/sys/vm/drop_caches``):

(a) baseline: ``dd if=IMG of=LOOP bs=4M conv=fsync`` followed by ``sha256sum IMG``;
(b) ``write_raw`` from ``file://IMG``;
(c) ``write_raw`` from a loopback HTTPS server (test CA, server in this process, writer in a child).

Our writer always runs in a child process (``python bench/slot_write.py --child ...``); its time is
the parent's wall clock around the child (interpreter start-up included) and its peak RSS comes
from ``os.wait4``.  The last line printed is ``ratio <kubeos file:// median / baseline median>``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "collections"))
sys.path.insert(0, str(REPO))

MIB = 1024 * 1024


@dataclass
class Sample:
    seconds: float
    maxrss_kib: int = 0
    parts: dict[str, float] = field(default_factory=dict)


@dataclass
class Series:
    name: str
    samples: list[Sample] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(s.seconds for s in self.samples)

    @property
    def peak_rss_mib(self) -> float:
        return max(s.maxrss_kib for s in self.samples) / 1024

    def part_median(self, name: str) -> float:
        return statistics.median(s.parts[name] for s in self.samples)


def run(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=True, text=True, capture_output=True, **kwargs)  # type: ignore[call-overload,no-any-return]


def drop_caches(settle: float) -> None:
    """Start cold: flush, drop the page cache, then let the (virtual) disk finish its own writeback."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
    time.sleep(settle)


def fill_random_tree(root: Path, total: int) -> None:
    """Random files of mixed sizes (many small, some large), about ``total`` bytes in all."""
    rnd = os.urandom
    written = 0
    i = 0
    sizes = [4096, 16384, 65536, 1 * MIB, 8 * MIB, 64 * MIB]
    while written < total:
        size = min(sizes[i % len(sizes)], total - written)
        d = root / f"d{i % 16:02d}"
        d.mkdir(exist_ok=True)
        with (d / f"f{i:05d}").open("wb") as f:
            left = size
            while left:
                n = min(left, 4 * MIB)
                f.write(rnd(n))
                left -= n
        written += size
        i += 1


def make_image(work: Path, size_mib: int) -> Path:
    """An ext4 image of ``size_mib`` MiB, about 85% full of random data (mkfs.ext4 -d, no mount)."""
    staging = work / "staging"
    staging.mkdir()
    fill_random_tree(staging, int(size_mib * MIB * 0.85))
    img = work / "rootfs.img"
    run(["mkfs.ext4", "-q", "-F", "-L", "ROOT-A", "-d", str(staging), str(img), f"{size_mib}M"])
    shutil.rmtree(staging)
    return img


def sha256_file(path: Path | str, limit: int | None = None) -> str:
    h = hashlib.sha256()
    left = limit
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(4 * MIB)
        view = memoryview(buf)
        while left is None or left > 0:
            n = f.readinto(view if left is None else view[: min(len(view), left)])
            if not n:
                break
            h.update(view[:n])
            if left is not None:
                left -= n
    return h.hexdigest()


@contextlib.contextmanager
def loop_device(backing: Path) -> Iterator[str]:
    dev = run(["losetup", "--find", "--show", str(backing)]).stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "--detach", dev], check=False)


def time_baseline(img: Path, dev: str) -> Sample:
    start = time.monotonic()
    run(["dd", f"if={img}", f"of={dev}", "bs=4M", "conv=fsync", "status=none"])
    middle = time.monotonic()
    run(["sha256sum", str(img)])
    end = time.monotonic()
    return Sample(end - start, parts={"dd": middle - start, "sha256sum": end - middle})


def time_child(args: list[str]) -> Sample:
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", *args]
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # Read the outputs before reaping: a child blocked on a full pipe would never exit.
    out, err = proc.stdout.read(), proc.stderr.read()  # type: ignore[union-attr]
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.monotonic() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"writer child failed ({proc.returncode}): {err.decode(errors='replace')}")
    json.loads(out)  # the child reports its result; a parse error means it misbehaved
    return Sample(seconds, usage.ru_maxrss)


def child_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("url")
    p.add_argument("target")
    p.add_argument("sha256")
    p.add_argument("capacity", type=int)
    p.add_argument("--ca")
    a = p.parse_args(argv)
    from ansible_collections.kubeos.os.plugins.module_utils.fetch import SourceOptions, open_source
    from ansible_collections.kubeos.os.plugins.module_utils.imagewrite import write_raw

    with open_source(SourceOptions(url=a.url, ca_cert=a.ca)) as src:
        result = write_raw(src, a.target, a.sha256, capacity=a.capacity)
    print(json.dumps({"bytes": result.bytes_written, "seconds": result.seconds, "sha256": result.sha256}))
    return 0


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return child_main(sys.argv[2:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-mib", type=int, default=1024, help="image size (default 1024)")
    p.add_argument("--runs", type=int, default=3, help="repetitions of each variant (default 3)")
    p.add_argument("--no-https", action="store_true", help="skip the HTTPS variant")
    p.add_argument(
        "--settle",
        type=float,
        default=3.0,
        help="seconds to wait after dropping caches before each timed run (default 3): on a VM the host "
        "is still flushing the previous run's gigabyte, which otherwise taxes every other run",
    )
    a = p.parse_args()
    if os.geteuid() != 0:
        print("run as root: the benchmark needs loop devices and drop_caches", file=sys.stderr)
        return 2

    from tests.support.tls import make_pki, serve

    work = Path(tempfile.mkdtemp(prefix="kubeos-bench-", dir="/var/tmp"))
    try:
        print(f"building a {a.size_mib} MiB ext4 image in {work} ...", flush=True)
        img = make_image(work, a.size_mib)
        digest = sha256_file(img)
        size = img.stat().st_size
        target = work / "slot.img"
        with target.open("wb") as f:
            f.truncate(size + 64 * MIB)
        capacity = target.stat().st_size
        pki = make_pki(work / "pki")
        series = {k: Series(k) for k in ("baseline", "file", "https")}
        with loop_device(target) as dev, serve(work, pki=pki) as server:
            # One untimed pass so every variant writes into already allocated target blocks.
            run(["dd", f"if={img}", f"of={dev}", "bs=4M", "conv=fsync", "status=none"])
            file_args = [f"file://{img}", dev, digest, str(capacity)]
            https_args = [f"{server.url}/{img.name}", dev, digest, str(capacity), "--ca", str(pki.ca_cert)]
            for i in range(a.runs):
                drop_caches(a.settle)
                series["baseline"].samples.append(time_baseline(img, dev))
                drop_caches(a.settle)
                series["file"].samples.append(time_child(file_args))
                if not a.no_https:
                    drop_caches(a.settle)
                    series["https"].samples.append(time_child(https_args))
                line = ", ".join(f"{s.name} {s.samples[-1].seconds:.3f} s" for s in series.values() if s.samples)
                print(f"run {i + 1}/{a.runs}: {line}", flush=True)
            written = sha256_file(dev, limit=size)
            if written != digest:
                raise RuntimeError(f"the loop device holds {written}, not the image {digest}")
        base = series["baseline"].median
        print(f"image: {size / MIB:.0f} MiB ext4, sha256 {digest}")
        print(f"caches: dropped (sync; echo 3 > /proc/sys/vm/drop_caches; sleep {a.settle:g}) before every timed run")
        print(
            f"baseline dd bs=4M conv=fsync + sha256sum: median {base:.3f} s "
            f"(dd alone {series['baseline'].part_median('dd'):.3f} s, "
            f"sha256sum alone {series['baseline'].part_median('sha256sum'):.3f} s)"
        )
        for key, label in (("file", "kubeos write_raw file://"), ("https", "kubeos write_raw https://")):
            s = series[key]
            if not s.samples:
                continue
            print(
                f"{label}: median {s.median:.3f} s ({size / MIB / s.median:.0f} MiB/s), "
                f"ratio {s.median / base:.3f}, peak RSS {s.peak_rss_mib:.1f} MiB"
            )
        print(f"ratio {series['file'].median / base:.3f}")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
