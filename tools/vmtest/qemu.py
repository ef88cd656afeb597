"""Boot a raw disk image under QEMU (software emulation, OVMF) and read what its serial console said.

``Qemu.boot(image)`` starts ``qemu-system-x86_64 -accel tcg -machine q35 -m 512 -nographic`` with the OVMF
code, a per-run copy of the OVMF variables, the image as a virtio disk, the serial console going to a file
and no network. Guest reboots stay inside the run (GRUB's trial tries need several boots); the run ends when
the guest powers off, when ``stop_on`` matched a console line, or at the hard timeout (the whole process
group is killed). Console lines are timestamped as they arrive, so the seconds each boot took are known.

``parse_console(text)`` finds, in order, the ``kubeos: …`` lines GRUB printed and the ``KUBEOS-TEST …``
lines of the test OS (tools/vmtest/testos), e.g. ``KUBEOS-TEST booted slot=A version=v1 … cmdline=…``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

OVMF_DIR = Path("/usr/share/OVMF")
# (code, vars) pairs, preferred first.
OVMF_PAIRS = (("OVMF_CODE_4M.fd", "OVMF_VARS_4M.fd"), ("OVMF_CODE.fd", "OVMF_VARS.fd"))
QEMU = "qemu-system-x86_64"
_PR_SET_PDEATHSIG = 1

# ANSI/VT100 sequences the firmware and GRUB print on the serial console. Cursor positioning starts a line.
_CURSOR_MOVE = re.compile(r"\x1b\[[0-9;]*[Hf]")
_ESCAPES = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[()][0-9A-Za-z]|\x1b[=>78cDEHMZ]")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_TEST_LINE = re.compile(r"KUBEOS-TEST (\S+)(?: (.*))?$")
_FIELD = re.compile(r"(\S+?)=(\S*)")


class QemuError(Exception):
    """QEMU could not be started or OVMF is missing."""


def clean_line(raw: str) -> str:
    """A console line without escape sequences, carriage returns or other control characters."""
    text = _ESCAPES.sub("", raw)
    return _CONTROL.sub("", text).strip()


def split_console(text: str) -> list[str]:
    """Console text as clean lines: newlines and cursor positioning both end a line."""
    text = _CURSOR_MOVE.sub("\n", text.replace("\r\n", "\n").replace("\r", "\n"))
    return [line for line in (clean_line(raw) for raw in text.split("\n")) if line]


@dataclass
class Event:
    """One line that matters, in console order: GRUB's ``kubeos:`` lines and the test OS' lines."""

    kind: str  # "grub", or the word after KUBEOS-TEST: "booted", "initramfs", "action", "cat", ...
    text: str  # the whole clean line
    t: float | None = None  # seconds since QEMU started, when known
    fields: dict[str, str] = field(default_factory=dict)


@dataclass
class Boot:
    """A ``KUBEOS-TEST booted …`` line: the slot's init ran."""

    slot: str
    version: str
    cmdline: str
    fields: dict[str, str]
    t: float | None = None


@dataclass
class Console:
    """What the console said, parsed."""

    text: str
    lines: list[str]
    events: list[Event]

    @property
    def boots(self) -> list[Boot]:
        """The ``KUBEOS-TEST booted`` lines, in order."""
        return [_boot(ev) for ev in self.events if ev.kind == "booted"]

    @property
    def grub(self) -> list[str]:
        """GRUB's ``kubeos: …`` lines, in order."""
        return [ev.text for ev in self.events if ev.kind == "grub"]

    @property
    def sequence(self) -> list[str]:
        """Compact order of what happened: ``grub:<line>`` and ``booted:<slot>:<version>`` items."""
        out = []
        for ev in self.events:
            if ev.kind == "grub":
                out.append(f"grub:{ev.text}")
            elif ev.kind == "booted":
                out.append(f"booted:{ev.fields.get('slot')}:{ev.fields.get('version')}")
        return out

    def of_kind(self, kind: str) -> list[Event]:
        return [ev for ev in self.events if ev.kind == kind]

    @property
    def panics(self) -> list[str]:
        return [line for line in self.lines if "Kernel panic - not syncing" in line]


def _boot(ev: Event) -> Boot:
    return Boot(
        slot=ev.fields.get("slot", ""),
        version=ev.fields.get("version", ""),
        cmdline=ev.fields.get("cmdline", ""),
        fields=ev.fields,
        t=ev.t,
    )


def _test_fields(rest: str) -> dict[str, str]:
    """key=value fields of a KUBEOS-TEST line; ``cmdline=`` and ``content=`` take the rest of the line."""
    fields: dict[str, str] = {}
    for key in ("cmdline", "content"):
        marker = f"{key}="
        pos = 0 if rest.startswith(marker) else rest.find(f" {marker}") + 1
        if rest.startswith(marker) or pos > 0:
            value = rest[pos + len(marker) :]
            fields[key] = _unescape(value) if key == "content" else value
            rest = rest[:pos]
            break
    for match in _FIELD.finditer(rest):
        fields.setdefault(match.group(1), match.group(2))
    return fields


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), value)


def parse_lines(lines: list[tuple[float | None, str]]) -> list[Event]:
    events: list[Event] = []
    for t, line in lines:
        pos = line.find("KUBEOS-TEST ")
        if pos >= 0:
            match = _TEST_LINE.match(line[pos:])
            if match:
                kind, rest = match.group(1), match.group(2) or ""
                events.append(Event(kind=kind, text=line[pos:], t=t, fields=_test_fields(rest)))
            continue
        if line.startswith("kubeos: "):
            events.append(Event(kind="grub", text=line, t=t))
    return events


def parse_console(text: str, stamped: list[tuple[float, str]] | None = None) -> Console:
    """Parse console text; ``stamped`` (time, raw line) pairs, when known, give each event its time."""
    if stamped is None:
        pairs: list[tuple[float | None, str]] = [(None, line) for line in split_console(text)]
    else:
        pairs = [(t, line) for t, raw in stamped for line in split_console(raw)]
    return Console(text=text, lines=[line for _, line in pairs], events=parse_lines(pairs))


@dataclass
class Attempt:
    """One boot of a slot: from GRUB's ``kubeos: booting slot S`` (the first from QEMU's start) to the next one."""

    slot: str
    start: float
    end: float
    booted: Boot | None  # the slot's init line, when it got that far

    @property
    def seconds(self) -> float:
        return self.end - self.start

    @property
    def seconds_to_init(self) -> float | None:
        return None if self.booted is None or self.booted.t is None else self.booted.t - self.start


@dataclass
class Run:
    """One QEMU run: what the console said and how it ended."""

    console: Console
    returncode: int | None
    timed_out: bool
    stopped: bool  # ended by stop_on
    seconds: float
    log: Path
    stamped: list[tuple[float, str]]

    @property
    def text(self) -> str:
        return self.console.text

    @property
    def boots(self) -> list[Boot]:
        return self.console.boots

    @property
    def powered_off(self) -> bool:
        return not self.timed_out and not self.stopped and self.returncode == 0

    def attempts(self) -> list[Attempt]:
        """Each boot of a slot with its duration: the first one includes the firmware's start."""
        out: list[Attempt] = []
        for ev in self.console.events:
            if ev.kind == "grub" and ev.text.startswith("kubeos: booting slot"):
                when = self.seconds if ev.t is None else ev.t
                if out:
                    out[-1].end = when
                out.append(Attempt(slot=ev.text.split()[3], start=when if out else 0.0, end=self.seconds, booted=None))
            elif ev.kind == "booted" and out and out[-1].booted is None:
                out[-1].booted = _boot(ev)
        return out

    def summary(self) -> str:
        parts = [f"{self.seconds:.1f} s", "timed out" if self.timed_out else f"exit {self.returncode}"]
        for a in self.attempts():
            what = f"{a.booted.slot}/{a.booted.version}" if a.booted else "no init"
            parts.append(f"slot {a.slot} ({what}) {a.seconds:.1f} s")
        return "; ".join(parts)


def _die_with_parent() -> None:
    """In the child: get SIGKILL when the process that started QEMU dies (even by SIGKILL or os._exit)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def ovmf_files() -> tuple[Path, Path]:
    for code, variables in OVMF_PAIRS:
        if (OVMF_DIR / code).is_file() and (OVMF_DIR / variables).is_file():
            return OVMF_DIR / code, OVMF_DIR / variables
    raise QemuError(f"OVMF firmware not found in {OVMF_DIR}: install the Debian package ovmf")


class Qemu:
    """Starts QEMU runs in ``workdir``; ``close()`` kills whatever is still running (use it in finally)."""

    def __init__(self, workdir: Path, *, memory_mib: int = 512, machine: str = "q35", firmware: str = "uefi") -> None:
        """``firmware``: ``uefi`` (OVMF) or ``bios`` (QEMU's SeaBIOS, for disks with a BIOS boot partition)."""
        if firmware not in ("uefi", "bios"):
            raise QemuError(f"firmware must be uefi or bios, not {firmware!r}")
        self.firmware = firmware
        if not shutil.which(QEMU):
            raise QemuError(f"{QEMU} not found: install the Debian package qemu-system-x86")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.memory_mib = memory_mib
        self.machine = machine
        self.code, self.vars_template = ovmf_files()
        self._procs: list[subprocess.Popen[bytes]] = []
        self._count = 0

    def command(self, image: Path, vars_file: Path, log: Path) -> list[str]:
        return [
            QEMU,
            "-accel",
            "tcg",
            "-machine",
            self.machine,
            "-m",
            str(self.memory_mib),
            "-smp",
            "1",
            "-nographic",
            "-monitor",
            "none",
            "-serial",
            f"file:{log}",
            "-nic",
            "none",
            *(
                [
                    "-drive",
                    f"if=pflash,format=raw,unit=0,readonly=on,file={self.code}",
                    "-drive",
                    f"if=pflash,format=raw,unit=1,file={vars_file}",
                ]
                if self.firmware == "uefi"
                else []
            ),
            "-drive",
            f"file={image},format=raw,if=virtio",
        ]

    def boot(
        self,
        image: str | os.PathLike[str],
        *,
        timeout: float = 180,
        stop_on: str | re.Pattern[str] | None = None,
    ) -> Run:
        """Run the image until the guest powers off, ``stop_on`` matches a clean console line, or ``timeout``."""
        self._count += 1
        run_dir = self.workdir / f"run-{self._count}"
        run_dir.mkdir(parents=True, exist_ok=True)
        vars_file = run_dir / "OVMF_VARS.fd"
        shutil.copyfile(self.vars_template, vars_file)
        log = run_dir / "console.log"
        log.write_bytes(b"")
        stop = re.compile(stop_on) if isinstance(stop_on, str) else stop_on
        stamped: list[tuple[float, str]] = []
        timed_out = stopped = False
        started = time.monotonic()
        with open(run_dir / "qemu.stderr", "wb") as err:
            proc = subprocess.Popen(
                self.command(Path(image), vars_file, log),
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        self._procs.append(proc)
        try:
            with open(log, "rb") as reader:
                pending = b""
                while True:
                    finished = proc.poll() is not None
                    chunk = reader.read()
                    now = time.monotonic() - started
                    if chunk:
                        pending += chunk
                        *complete, pending = pending.split(b"\n")
                        for raw in complete:
                            stamped.append((now, raw.decode("utf-8", "replace")))
                            if stop and any(stop.search(line) for line in split_console(stamped[-1][1])):
                                stopped = True
                    if finished or stopped:
                        break
                    if now > timeout:
                        timed_out = True
                        break
                    time.sleep(0.05)
                if pending:
                    stamped.append((time.monotonic() - started, pending.decode("utf-8", "replace")))
        finally:
            self._kill(proc)
        seconds = time.monotonic() - started
        text = log.read_bytes().decode("utf-8", "replace")
        return Run(
            console=parse_console(text, stamped),
            returncode=None if (timed_out or stopped) else proc.returncode,
            timed_out=timed_out,
            stopped=stopped,
            seconds=seconds,
            log=log,
            stamped=stamped,
        )

    @staticmethod
    def _kill(proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL does not fail
            proc.kill()
            proc.wait()

    def close(self) -> None:
        """Kill every QEMU this object started that still runs."""
        for proc in self._procs:
            self._kill(proc)
        self._procs.clear()


@contextlib.contextmanager
def qemu_session(workdir: Path) -> Iterator[Qemu]:
    """A Qemu for a with-block or a fixture: every process it started is killed at the end."""
    machine = Qemu(workdir)
    try:
        yield machine
    finally:
        machine.close()
