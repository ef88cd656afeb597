"""Boot a kubeos node disk (the Debian node OS of build.py) in QEMU and read what its test driver printed.

``NodeQemu`` is ``vmtest.qemu.Qemu`` with extra read-only virtio disks after the node's own (the first one
becomes ``/dev/vdb``: the upgrade payload) and reboots as power cycles (``boot_node``). ``node_events(run)`` turns the driver's
``KUBEOS-NODE <kind> <json>`` console lines (see rootfs/usr/local/lib/kubeos_node/driver.py) into events,
in console order, with the seconds since QEMU started; ``queue_commands`` writes the driver's command queue
and the health switch onto PERSIST while the VM is off.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from vmtest.disk import mounted_partition
from vmtest.qemu import Qemu, Run, parse_console, split_console

NODE_LINE = re.compile(r"KUBEOS-NODE (\S+)(?: (.*))?$")
STATE_DIR = "kubeos-test"  # on PERSIST, /persist/kubeos-test in the node


@dataclass
class NodeEvent:
    kind: str  # booted, agent, status, settled, upgrade, health, stopping, action, ...
    fields: dict[str, Any]
    t: float | None  # seconds since QEMU started
    text: str

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)


@dataclass
class NodeBoot:
    """One boot of the node: GRUB's choice, then everything the driver printed until the next boot."""

    grub: list[str]
    start: float | None  # when GRUB said "kubeos: booting slot …"
    events: list[NodeEvent] = field(default_factory=list)

    @property
    def booted(self) -> NodeEvent | None:
        return next((ev for ev in self.events if ev.kind == "booted"), None)

    def first(self, kind: str) -> NodeEvent | None:
        return next((ev for ev in self.events if ev.kind == kind), None)

    def last(self, kind: str) -> NodeEvent | None:
        found = [ev for ev in self.events if ev.kind == kind]
        return found[-1] if found else None

    def of_kind(self, kind: str) -> list[NodeEvent]:
        return [ev for ev in self.events if ev.kind == kind]


class NodeQemu(Qemu):
    """Qemu for the node: extra read-only virtio disks (``extra_disks``, /dev/vdb onwards), and reboots as
    power cycles.

    ``boot_node`` runs QEMU with ``-no-reboot``: when the guest resets (``systemctl reboot``, a kernel panic
    with ``panic=N``), QEMU exits and is started again on the same disk at once, until the guest powers off,
    the time is up or ``max_boots`` is reached. Warm resets inside one QEMU (what ``Qemu.boot`` allows) hung
    here in OVMF/GRUB now and then once a second virtio disk was attached (right after "Welcome to GRUB!",
    twice in about ten reboots with 512 MiB), and took up to 19 s of firmware with 1 GiB; a fresh QEMU
    boots in about 4 s every time. The GRUB environment on the disk, and so the trial counting, is what
    carries over, as on real hardware.
    """

    def __init__(self, workdir: Path, *, memory_mib: int = 512) -> None:
        super().__init__(workdir, memory_mib=memory_mib)
        self.extra_disks: list[Path] = []
        self._no_reboot = False
        self._closed = False

    def command(self, image: Path, vars_file: Path, log: Path) -> list[str]:
        argv = super().command(image, vars_file, log)
        for disk in self.extra_disks:
            argv += ["-drive", f"file={disk},format=raw,if=virtio,readonly=on"]
        if self._no_reboot:
            argv.append("-no-reboot")
        return argv

    def boot_node(self, image: str | os.PathLike[str], *, timeout: float, max_boots: int = 8) -> Run:
        """Boot until the guest powers off; every reset starts a new QEMU. One merged ``Run`` for all."""
        runs: list[Run] = []
        started = time.monotonic()
        self._no_reboot = True
        try:
            while len(runs) < max_boots and not self._closed:
                remaining = timeout - (time.monotonic() - started)
                if remaining <= 0:
                    break
                offset = time.monotonic() - started
                run = self.boot(image, timeout=remaining)
                runs.append(_shifted(run, offset))
                if run.timed_out or run.stopped or run.returncode != 0 or _powered_off(run):
                    break
        finally:
            self._no_reboot = False
        return _merge(runs, time.monotonic() - started, self.workdir)

    def close(self) -> None:
        """Kill every QEMU this object started that still runs; ``boot_node`` starts no new one afterwards
        (call again if a ``boot_node`` in another thread was just starting one)."""
        self._closed = True
        super().close()


def _powered_off(run: Run) -> bool:
    """Did the guest's kernel power the machine off (rather than reset it)?"""
    for line in reversed(run.console.lines):
        if "reboot: Power down" in line:
            return True
        if "reboot: Restarting system" in line or "Kernel panic - not syncing" in line:
            return False
    return False


def _shifted(run: Run, offset: float) -> Run:
    stamped = [(t + offset, raw) for t, raw in run.stamped]
    return replace(run, stamped=stamped, console=parse_console(run.text, stamped))


def _merge(runs: list[Run], seconds: float, workdir: Path) -> Run:
    """One Run over several QEMU starts: console text and timed lines in order, the last run's ending."""
    if not runs:
        raise ValueError("no QEMU run to merge")
    if len(runs) == 1:
        return replace(runs[0], seconds=seconds)
    last = runs[-1]
    text = "".join(run.text for run in runs)
    stamped = [pair for run in runs for pair in run.stamped]
    log = workdir / f"console-{len(list(workdir.glob('console-*.log'))) + 1}.log"
    log.write_text(text)
    return Run(
        console=parse_console(text, stamped),
        returncode=last.returncode,
        timed_out=last.timed_out,
        stopped=last.stopped,
        seconds=seconds,
        log=log,
        stamped=stamped,
    )


def _parse(line: str, t: float | None) -> NodeEvent | None:
    pos = line.find("KUBEOS-NODE ")
    if pos < 0:
        return None
    match = NODE_LINE.match(line[pos:])
    if not match:
        return None
    kind, rest = match.group(1), (match.group(2) or "").strip()
    fields: dict[str, Any] = {}
    if rest:
        try:
            parsed = json.loads(rest)
        except ValueError:
            kind, fields = "garbled", {"kind": kind, "rest": rest}
        else:
            fields = parsed if isinstance(parsed, dict) else {"value": parsed}
    return NodeEvent(kind=kind, fields=fields, t=t, text=line[pos:])


def node_events(run: Run) -> list[NodeEvent]:
    """The driver's lines in console order (``garbled`` when a line's JSON was cut by other output)."""
    events = []
    for t, raw in run.stamped:
        for line in split_console(raw):
            event = _parse(line, t)
            if event is not None:
                events.append(event)
    return events


def node_boots(run: Run) -> list[NodeBoot]:
    """The run split into boots at GRUB's ``kubeos: booting slot`` lines, each with the driver's events."""
    boots: list[NodeBoot] = []
    grub: list[str] = []
    for t, raw in run.stamped:
        for line in split_console(raw):
            if line.startswith("kubeos: "):
                grub.append(line)
                if line.startswith("kubeos: booting slot"):
                    boots.append(NodeBoot(grub=grub, start=t))
                    grub = []
                continue
            event = _parse(line, t)
            if event is not None:
                if not boots:
                    boots.append(NodeBoot(grub=[], start=None))
                boots[-1].events.append(event)
    return boots


def boot_summary(boots: list[NodeBoot], end: float) -> list[dict[str, Any]]:
    """Per boot: slot, version, and seconds from GRUB's choice to the driver's first line, to the agent's
    readiness, to its decision (``settled``), and in all (to the next boot or the end of the run)."""
    rows = []
    for index, boot in enumerate(boots):
        booted = boot.booted
        nxt = boots[index + 1].start if index + 1 < len(boots) else end
        start = boot.start if boot.start is not None else 0.0

        def since(event: NodeEvent | None, start: float = start) -> float | None:
            return None if event is None or event.t is None else round(event.t - start, 1)

        rows.append(
            {
                "slot": booted.get("slot") if booted else None,
                "version": booted.get("version") if booted else None,
                "to_userspace_s": since(booted),
                "to_agent_s": since(boot.first("agent")),
                "to_settled_s": since(boot.first("settled")),
                "total_s": None if nxt is None else round(nxt - start, 1),
            }
        )
    return rows


def queue_commands(image: Path, commands: list[str], *, unhealthy_versions: list[str] | None = None) -> None:
    """Replace the driver's command queue (and the list of versions whose health check fails) on PERSIST."""
    with mounted_partition(image, "PERSIST") as root:
        state = root / STATE_DIR
        state.mkdir(exist_ok=True)
        (state / "commands").write_text("".join(f"{line}\n" for line in commands))
        unhealthy = state / "unhealthy-versions"
        if unhealthy_versions:
            unhealthy.write_text("".join(f"{v}\n" for v in unhealthy_versions))
        else:
            unhealthy.unlink(missing_ok=True)


def read_persist_file(image: Path, relpath: str) -> str | None:
    with mounted_partition(image, "PERSIST") as root:
        path = root / relpath
        return path.read_text(errors="replace") if path.is_file() else None


def node_journal(image: Path, units: tuple[str, ...] = ("kubeos-agent.service",), lines: int = 200) -> str:
    """The node's systemd journal (kept on PERSIST, /var/log/journal) for ``units``, read on the host."""
    with mounted_partition(image, "PERSIST") as root:
        directory = root / "var/log/journal"
        if not directory.is_dir():
            return f"(no journal in {directory.relative_to(root)} on PERSIST)"
        argv = ["journalctl", "--directory", str(directory), "--no-pager", "--output", "short-monotonic"]
        argv += ["--lines", str(lines)]
        for unit in units:
            argv += ["--unit", unit]
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"(journalctl failed: {exc})"
        return proc.stdout + proc.stderr


def provision_disk(
    disk: Path,
    payload: Path,
    sha256: str,
    *,
    size_mib: int,
    root_size: str,
    kernel_args: str = "console=ttyS0",
    panic_timeout: int = 5,
    workdir: Path,
) -> None:
    """A fresh sparse disk image laid out by playbooks/provision.yml with ``payload`` in slot A, committed."""
    repo = Path(__file__).resolve().parents[3]
    with open(disk, "wb") as handle:
        handle.truncate(size_mib * 1024 * 1024)
    env = {
        **os.environ,
        "ANSIBLE_COLLECTIONS_PATH": str(repo / "collections"),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_LOCALHOST_WARNING": "False",
        "ANSIBLE_INVENTORY_UNPARSED_WARNING": "False",
        "ANSIBLE_HOME": str(workdir / "ansible-home"),
    }
    argv = [str(Path(sys.executable).parent / "ansible-playbook"), str(repo / "playbooks/provision.yml")]
    for key, value in {
        "device": str(disk),
        "image": f"file://{payload}",
        "sha256": sha256,
        "root_size": root_size,
        "kernel_args": kernel_args,
        "panic_timeout": str(panic_timeout),
    }.items():
        argv += ["-e", f"{key}={value}"]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"ansible-playbook provision.yml failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")


def detach_loops(path: Path) -> None:
    """Detach loop devices still attached over ``path`` (after a module was killed, for instance)."""
    res = subprocess.run(
        ["losetup", "--associated", str(path), "--noheadings", "--output", "NAME"],
        capture_output=True,
        text=True,
        check=False,
    )
    for device in res.stdout.split():
        subprocess.run(["umount", "--recursive", "--quiet", device], check=False)
        subprocess.run(["losetup", "--detach", device], check=False)
