"""The kubeos main job, on one machine, no cluster: provision, boot, upgrade, fall back from a broken image.

1. build the test OS (Debian kernel, busybox initramfs; v1 and v2 work, v3's init fails), cached;
2. turn each root filesystem into an upgrade payload with playbooks/build_image.yml (cached too);
3. provision a fresh disk image with playbooks/provision.yml (v1 in slot A, committed);
4. boot it in QEMU (OVMF, GRUB, -accel tcg): slot A, v1; v1 leaves a file on PERSIST;
5. upgrade to v2 with playbooks/upgrade.yml (slot B, trial of 3 boots), boot: B v2 on trial;
   commit with playbooks/commit.yml, boot again: B v2;
6. upgrade to the broken v3 (slot A, trial), boot: v3 panics on every try, GRUB falls back to B v2 by itself;
7. print what each boot did and how long it took.

Every slot and version in the summary is what the booted OS printed on its serial console.
Run as root: ``make demo`` (or ``.venv/bin/python scripts/demo.py``). Work files: /var/tmp/kubeos-demo.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))

from vmtest.disk import mounted_partition, queue_actions  # noqa: E402
from vmtest.qemu import Run, qemu_session  # noqa: E402
from vmtest.testos import build as testos_build  # noqa: E402

MIB = 1024 * 1024
BOOT_TIMEOUT = 300
MARKER = "demo-marker"


def say(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def detail(text: str) -> None:
    print(f"    {text}", flush=True)


def playbook(book: str, **extra: str) -> None:
    """Run one of the repository's playbooks; show its output only when it fails."""
    argv = [str(Path(sys.executable).parent / "ansible-playbook"), str(REPO / "playbooks" / book)]
    for key, value in extra.items():
        argv += ["-e", f"{key}={value}"]
    env = {
        **os.environ,
        "ANSIBLE_COLLECTIONS_PATH": str(REPO / "collections"),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_LOCALHOST_WARNING": "False",
        "ANSIBLE_INVENTORY_UNPARSED_WARNING": "False",
    }
    started = time.monotonic()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        print(proc.stdout + proc.stderr)
        raise SystemExit(f"demo: ansible-playbook {book} failed (exit {proc.returncode})")
    recap = [line for line in proc.stdout.splitlines() if line.startswith("localhost")]
    detail(
        f"ansible-playbook {book}: {recap[-1].split(':', 1)[1].split('unreachable')[0].strip() if recap else 'ok'}"
        f" ({time.monotonic() - started:.1f} s)"
    )


@dataclass
class Row:
    step: str
    slot: str
    version: str
    outcome: str
    seconds: float


def boot(qemu_dir: Path, image: Path, step: str, rows: list[Row], *, timeout: float = BOOT_TIMEOUT) -> Run:
    with qemu_session(qemu_dir) as qemu:
        run = qemu.boot(image, timeout=timeout)
    for ev in run.console.events:  # console order
        if ev.kind == "grub":
            detail(f"GRUB  | {ev.text}")
        elif ev.kind == "booted":
            detail(f"OS    | slot {ev.fields.get('slot')} version {ev.fields.get('version')}: init started")
        elif ev.kind == "init-failed":
            detail(
                f"OS    | slot {ev.fields.get('slot')} version {ev.fields.get('version')}: init failed, kernel panic"
            )
        elif ev.kind == "cat":
            detail(f"OS    | PERSIST file {ev.fields.get('name')}: {ev.fields.get('content', '<missing>')}")
    for attempt in run.attempts():
        if attempt.booted is None:
            rows.append(Row(step, attempt.slot, "?", "did not start", attempt.seconds))
            continue
        booted = attempt.booted
        failed = any(
            ev.kind == "init-failed" and ev.t is not None and attempt.start <= ev.t <= attempt.end
            for ev in run.console.events
        )
        rows.append(
            Row(step, booted.slot, booted.version, "init failed, kernel panic" if failed else "booted", attempt.seconds)
        )
    if run.timed_out:
        raise SystemExit(f"demo: the VM did not power off within {timeout:.0f} s; console log: {run.log}")
    return run


def grubenv(image: Path) -> str:
    with mounted_partition(image, "BOOT") as boot_fs:
        return subprocess.run(
            ["grub-editenv", str(boot_fs / "grub/grubenv"), "list"], capture_output=True, text=True, check=True
        ).stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=os.environ.get("KUBEOS_DEMO_DIR", "/var/tmp/kubeos-demo"))
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("demo: run as root (loop devices, mkfs, mount)")
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    images = work / "images"
    node = work / "node.img"
    rows: list[Row] = []
    started = time.monotonic()

    say("Test OS: Debian kernel, busybox initramfs, root filesystems v1, v2 and a broken v3 (cached)")
    manifest = testos_build.ensure(log=detail)
    paths = manifest["paths"]

    say("Upgrade payloads from the root filesystems (playbooks/build_image.yml; cached while unchanged)")
    payload: dict[str, tuple[Path, str]] = {}
    for version in ("v1", "v2", "v3"):
        playbook(
            "build_image.yml",
            rootfs=paths[f"rootfs-{version}.tar"],
            output_dir=str(images),
            name=f"kubeos-{version}",
            disk="false",
        )
        ext4 = images / f"kubeos-{version}.ext4"
        sha = (images / f"kubeos-{version}.ext4.sha256").read_text().split()[0]
        payload[version] = (ext4, sha)
        detail(f"{ext4.name}: {ext4.stat().st_size // MIB} MiB, sha256 {sha[:16]}…")

    say("Provision a fresh 1 GiB disk image: layout, v1 into slot A, committed (playbooks/provision.yml)")
    node.unlink(missing_ok=True)
    with open(node, "wb") as handle:
        handle.truncate(1024 * MIB)
    playbook(
        "provision.yml",
        device=str(node),
        image=f"file://{payload['v1'][0]}",
        sha256=payload["v1"][1],
        root_size="256MiB",
        kernel_args="console=ttyS0",
        panic_timeout="1",
    )

    say("Boot 1: the committed slot")
    queue_actions(node, [f"write {MARKER} written-under-v1", "poweroff"])
    boot(work / "qemu", node, "first boot", rows)

    say("Upgrade to v2: stream it into the inactive slot, verified, and arm a trial of 3 boots")
    playbook("upgrade.yml", device=str(node), image=f"file://{payload['v2'][0]}", sha256=payload["v2"][1])
    say("Boot 2: the trial slot")
    queue_actions(node, [f"cat {MARKER}", "poweroff"])
    boot(work / "qemu", node, "v2 on trial", rows)
    say("v2 came up: commit it (playbooks/commit.yml), boot 3")
    playbook("commit.yml", device=str(node))
    boot(work / "qemu", node, "v2 committed", rows)

    say("Upgrade to v3, whose init fails: trial of 3 boots")
    playbook("upgrade.yml", device=str(node), image=f"file://{payload['v3'][0]}", sha256=payload["v3"][1])
    say("Boot 4: v3 panics on every try; GRUB falls back to the committed v2 by itself")
    queue_actions(node, [f"cat {MARKER}", "poweroff"])
    boot(work / "qemu", node, "v3 on trial", rows, timeout=3 * BOOT_TIMEOUT)
    say("GRUB environment afterwards (grub-editenv list)")
    for line in grubenv(node).splitlines():
        detail(line)

    say("Summary (every slot and version as the booted OS printed it)")
    print(f"    {'step':<14} {'slot':<5} {'version':<8} {'outcome':<28} {'seconds':>7}")
    for row in rows:
        print(f"    {row.step:<14} {row.slot:<5} {row.version:<8} {row.outcome:<28} {row.seconds:>7.1f}")
    good = [r.seconds for r in rows if r.outcome == "booted"]
    print(
        f"\n    boots: {len(rows)}, median seconds per boot {statistics.median(good):.1f} (working OS, "
        f"firmware to power-off), demo total {time.monotonic() - started:.0f} s"
    )
    expected = [("A", "v1"), ("B", "v2"), ("B", "v2"), ("A", "v3"), ("A", "v3"), ("A", "v3"), ("B", "v2")]
    got = [(r.slot, r.version) for r in rows]
    if got != expected:
        raise SystemExit(f"demo: the boots were {got}, expected {expected}")
    print("    result: the node upgraded to v2, and the broken v3 could not take it down.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
