#!/usr/bin/python3
"""kubeos node VM test driver (kubeos-test-driver.service): Debian's python3, standard library only.

Every line meant for the test goes to the serial console (/dev/console, one write per line) as
``KUBEOS-NODE <kind> <json>``, and to the journal. At each boot it

1. prints ``booted``: the slot from ``kubeos.slot=`` on /proc/cmdline, the os-release version, the root
   device and its GPT PARTUUID and name (blkid -p), and whether they agree with ``root=PARTUUID=`` and the
   slot (``check``: ``ok`` or what disagreed); the boot number counts lines in /persist/kubeos-test/boots;
2. waits for the agent's socket (``agent``), then for the agent's decision about this boot: it polls
   ``GET /v1/status`` (one small request, not a Python start-up of kubeosctl every second) until no
   operation runs and no trial slot is running, printing ``status`` whenever the summary changes and
   ``settled`` at the end, then ``failed-units`` (systemctl --failed);
3. runs the commands queued in /persist/kubeos-test/commands, one line at a time, removing each line
   (atomically, synced) before running it, so that the lines after a reboot stay for the next boot:

   upgrade IMAGE SHA256 [ARGS…]  kubeosctl --json upgrade --image IMAGE --sha256 SHA256 ARGS…; prints
                                 ``upgrade`` (both operations' outcome); when it succeeded the agent
                                 reboots the node, and the driver waits for that
   kubeosctl ARGS…               any kubeosctl command; prints ``kubeosctl`` (exit code, output)
   status                        kubeosctl --json status; prints ``ctl-status`` (the summary)
   journal UNIT [N]              the unit's last N journal lines (``journal``)
   sleep SECONDS
   poweroff | reboot             systemctl poweroff / reboot
   (no command left)             poweroff

On SIGTERM (the node is going down) it prints ``stopping``. The agent reboots the node while
``kubeosctl upgrade`` still waits for the end of its operation: the unit's ``KillMode=mixed`` spares
kubeosctl, and the driver (stopped before the agent, being ordered after it) lets it finish and prints
its ``upgrade`` line first.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

STATE = Path("/persist/kubeos-test")
COMMANDS = STATE / "commands"
BOOTS = STATE / "boots"
SOCKET = "/run/kubeos/agent.sock"
KUBEOSCTL = "/opt/kubeos/venv/bin/kubeosctl"
CONSOLE = "/dev/console"
AGENT_WAIT = 300.0
SETTLE_WAIT = 600.0
SHUTDOWN_WAIT = 300.0
TAIL = 40

# What must finish before the driver gives in to SIGTERM, and whether SIGTERM came meanwhile.
_busy: str | None = None
_terminating = False


def uptime() -> float:
    try:
        return float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return -1.0


def say(kind: str, **fields: Any) -> None:
    fields["up"] = uptime()
    line = f"KUBEOS-NODE {kind} {json.dumps(fields, sort_keys=True, separators=(',', ':'))}\n"
    sys.stdout.write(line)
    sys.stdout.flush()
    with contextlib.suppress(OSError):
        fd = os.open(CONSOLE, os.O_WRONLY | os.O_NOCTTY | os.O_APPEND)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)


def memory() -> dict[str, int | None]:
    """MiB available now, and the most the agent's cgroup (with its playbooks and modules) ever used."""

    def mib(path: str, field: str | None = None) -> int | None:
        try:
            text = Path(path).read_text()
        except OSError:
            return None
        if field is None:
            return int(text.split()[0]) // (1024 * 1024)
        for line in text.splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) // 1024
        return None

    return {
        "available_mib": mib("/proc/meminfo", "MemAvailable"),
        "agent_peak_mib": mib("/sys/fs/cgroup/system.slice/kubeos-agent.service/memory.peak"),
    }


def tail(text: str, lines: int = TAIL) -> list[str]:
    return [line for line in text.splitlines() if line.strip()][-lines:]


def capture(argv: list[str], timeout: float = 60.0) -> tuple[int, str, str]:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return 124, out, f"timed out after {timeout:g} s"
    except OSError as exc:
        return 127, "", f"cannot run {argv[0]}: {exc}"
    return proc.returncode, proc.stdout, proc.stderr


# --- what booted -------------------------------------------------------------------------------------------------


def cmdline_args() -> dict[str, str]:
    args: dict[str, str] = {}
    for word in Path("/proc/cmdline").read_text().split():
        key, _, value = word.partition("=")
        args[key] = value
    return args


def os_release() -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in Path("/usr/lib/os-release").read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep:
            fields[key.strip()] = value.strip().strip('"')
    return fields


def root_device() -> str:
    majmin = ""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if len(fields) > 4 and fields[4] == "/":
            majmin = fields[2]
    for line in Path(f"/sys/dev/block/{majmin}/uevent").read_text().splitlines():
        if line.startswith("DEVNAME="):
            return "/dev/" + line.split("=", 1)[1]
    return f"unknown({majmin})"


def probe(device: str) -> dict[str, str]:
    _, out, _ = capture(["blkid", "--probe", "--output", "export", device])
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def report_boot() -> None:
    args = cmdline_args()
    release = os_release()
    slot = args.get("kubeos.slot", "")
    root = args.get("root", "")
    device = root_device()
    info = probe(device) if device.startswith("/dev/") else {}
    partuuid = info.get("PART_ENTRY_UUID", "").lower()
    partlabel = info.get("PART_ENTRY_NAME", "")
    check = "ok"
    if root.lower() != f"partuuid={partuuid}":
        check = f"root-mismatch(cmdline {root}, mounted {partuuid or '?'})"
    elif partlabel != f"ROOT-{slot}":
        check = f"slot-mismatch(cmdline {slot}, partition {partlabel or '?'})"
    boot = 1
    try:
        STATE.mkdir(parents=True, exist_ok=True)
        if BOOTS.exists():
            boot = len(BOOTS.read_text().splitlines()) + 1
        with open(BOOTS, "a") as handle:
            handle.write(f"{boot} slot={slot} version={release.get('VERSION_ID', '')} partuuid={partuuid}\n")
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        say("warning", message=f"cannot count boots on PERSIST: {exc}")
    say(
        "booted",
        boot=boot,
        slot=slot,
        version=release.get("VERSION_ID", ""),
        pretty=release.get("PRETTY_NAME", ""),
        device=device,
        partuuid=partuuid,
        partlabel=partlabel,
        fslabel=info.get("LABEL", ""),
        check=check,
        kernel=os.uname().release,
        cmdline=" ".join(f"{k}={v}" if v else k for k, v in args.items()),
    )


# --- the agent ---------------------------------------------------------------------------------------------------


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def agent_status(timeout: float = 30.0) -> dict[str, Any]:
    conn = _UnixConnection(SOCKET, timeout)
    try:
        conn.request("GET", "/v1/status")
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    if response.status != 200:
        raise OSError(f"GET /v1/status: HTTP {response.status}: {body[:200]!r}")
    data = json.loads(body)
    if not isinstance(data, dict):
        raise OSError("GET /v1/status: not a JSON object")
    return data


def _op(op: Any, *, detail: bool = False) -> dict[str, Any] | None:
    if not isinstance(op, dict):
        return None
    brief = {key: op.get(key) for key in ("id", "kind", "state", "phase", "outcome")}
    if detail:
        brief["outcome_detail"] = op.get("outcome_detail")
        brief["error"] = op.get("error")
    return brief


def summarize(status: dict[str, Any]) -> dict[str, Any]:
    disk = status.get("disk") or {}
    grub = disk.get("grub") or {}
    return {
        "running": disk.get("running_slot"),
        "committed": grub.get("default"),
        "trial": grub.get("trial"),
        "tries": grub.get("tries"),
        "trial_failed": grub.get("trial_failed"),
        "slots": {
            name: {"version": slot.get("version"), "bootable": slot.get("bootable")}
            for name, slot in sorted((disk.get("slots") or {}).items())
        },
        "operation": _op(status.get("current_operation")),
        "last_operation": _op(status.get("last_operation")),
        "upgrade": _op(status.get("last_upgrade"), detail=True),
        "disk_error": status.get("disk_error"),
        "disk_stale": status.get("disk_stale"),
    }


def settled(status: dict[str, Any]) -> bool:
    """No operation runs, the disk could be read, and the running slot is not (any more) on trial."""
    disk = status.get("disk")
    if status.get("current_operation") or not isinstance(disk, dict) or status.get("disk_stale"):
        return False
    trial = (disk.get("grub") or {}).get("trial")
    return not (trial and trial == disk.get("running_slot"))


def journal(unit: str, lines: int = TAIL) -> None:
    _, out, err = capture(["journalctl", "--unit", unit, "--lines", str(lines), "--output", "cat", "--no-pager"])
    say("journal", unit=unit, lines=tail(out or err, lines))


def wait_for_agent() -> bool:
    started = time.monotonic()
    error = ""
    while time.monotonic() - started < AGENT_WAIT:
        try:
            agent_status()
        except (OSError, ValueError, http.client.HTTPException) as exc:
            error = str(exc)
            time.sleep(1)
            continue
        say("agent", ready=True, waited=round(time.monotonic() - started, 1))
        return True
    say("agent", ready=False, waited=round(time.monotonic() - started, 1), error=error)
    journal("kubeos-agent.service")
    return False


def wait_until_settled() -> None:
    started = time.monotonic()
    last: dict[str, Any] | None = None
    while time.monotonic() - started < SETTLE_WAIT:
        try:
            status = agent_status()
        except (OSError, ValueError, http.client.HTTPException) as exc:
            say("status-error", error=str(exc))
            time.sleep(2)
            continue
        summary = summarize(status)
        if settled(status):
            say("settled", waited=round(time.monotonic() - started, 1), memory=memory(), **summary)
            return
        if summary != last:
            say("status", **summary)
            last = summary
        time.sleep(1)
    say("settle-timeout", waited=round(time.monotonic() - started, 1))
    journal("kubeos-agent.service")


def failed_units() -> None:
    _, out, _ = capture(["systemctl", "--failed", "--plain", "--no-legend", "--no-pager"])
    say("failed-units", units=[line.split()[0] for line in out.splitlines() if line.strip()])


# --- commands ----------------------------------------------------------------------------------------------------


def next_command() -> str | None:
    """Take the first command off the queue (the rest is written back and synced before it runs)."""
    try:
        lines = COMMANDS.read_text().splitlines()
    except FileNotFoundError:
        return None
    while lines and (not lines[0].strip() or lines[0].lstrip().startswith("#")):
        lines.pop(0)
    if not lines:
        return None
    first = lines.pop(0).strip()
    tmp = COMMANDS.with_name(COMMANDS.name + ".new")
    with open(tmp, "w") as handle:
        handle.write("".join(f"{line}\n" for line in lines))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, COMMANDS)
    fd = os.open(STATE, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return first


def await_shutdown(why: str) -> None:
    """The node is about to go down (reboot or poweroff): wait for systemd's SIGTERM."""
    say("awaiting-shutdown", why=why)
    time.sleep(SHUTDOWN_WAIT)
    say("shutdown-timeout", why=why, waited=SHUTDOWN_WAIT)


def _result(op: Any, keys: tuple[str, ...]) -> dict[str, Any] | None:
    if not isinstance(op, dict):
        return None
    result = op.get("result") or {}
    return {
        "state": op.get("state"),
        "phase": op.get("phase"),
        "outcome": op.get("outcome"),
        "error": op.get("error"),
        **{key: result.get(key) for key in keys},
    }


def cmd_upgrade(args: list[str]) -> None:
    if len(args) < 2:
        say("command-error", message="usage: upgrade IMAGE SHA256 [kubeosctl upgrade arguments]")
        return
    global _busy
    image, digest, extra = args[0], args[1], args[2:]
    argv = [KUBEOSCTL, "--json", "upgrade", "--image", image, "--sha256", digest, *extra]
    started = time.monotonic()
    _busy = "kubeosctl upgrade"
    try:
        rc, out, err = capture(argv, timeout=1800)
    finally:
        _busy = None
    try:
        documents = json.loads(out) if out.strip() else {}
    except ValueError:
        documents = {}
    say(
        "upgrade",
        rc=rc,
        seconds=round(time.monotonic() - started, 1),
        prepare=_result(documents.get("prepare_upgrade"), ("slot", "bytes_written", "seconds", "version", "sha256")),
        arm=_result(documents.get("upgrade"), ("trial_slot", "from_slot", "tries")),
        stderr=tail(err, 10),
        stdout=[] if documents else tail(out, 10),
        memory=memory(),
    )
    if _terminating:
        stop("SIGTERM")
    if rc != 0:
        journal("kubeos-agent.service")
    elif "--no-reboot" not in extra and "--prepare-only" not in extra:
        await_shutdown("the agent reboots into the trial slot")


def cmd_kubeosctl(args: list[str]) -> None:
    started = time.monotonic()
    rc, out, err = capture([KUBEOSCTL, *args], timeout=1800)
    say(
        "kubeosctl",
        argv=args,
        rc=rc,
        seconds=round(time.monotonic() - started, 1),
        stdout=tail(out),
        stderr=tail(err, 10),
    )


def cmd_status() -> None:
    rc, out, err = capture([KUBEOSCTL, "--json", "status"])
    try:
        summary = summarize(json.loads(out))
    except (ValueError, AttributeError):
        say("ctl-status", rc=rc, error=tail(err or out, 10))
        return
    say("ctl-status", rc=rc, **summary)


def shutdown(action: str) -> None:
    say("action", action=action)
    os.sync()
    rc, _, err = capture(["systemctl", action], timeout=120)
    if rc != 0:
        say("command-error", message=f"systemctl {action} failed ({rc}): {' '.join(tail(err, 5))}")
        return
    await_shutdown(action)


def run_commands() -> None:
    while True:
        try:
            line = next_command()
        except OSError as exc:
            say("command-error", message=f"cannot read {COMMANDS}: {exc}")
            line = None
        if line is None:
            say("idle")
            shutdown("poweroff")
            return
        words = line.split()
        verb, args = words[0], words[1:]
        say("command", line=line)
        if verb == "upgrade":
            cmd_upgrade(args)
        elif verb == "kubeosctl":
            cmd_kubeosctl(args)
        elif verb == "status":
            cmd_status()
        elif verb == "journal" and args:
            journal(args[0], int(args[1]) if len(args) > 1 else TAIL)
        elif verb == "sleep":
            time.sleep(float(args[0]) if args else 1.0)
        elif verb in ("poweroff", "reboot"):
            shutdown(verb)
        else:
            say("command-error", message=f"unknown command: {line}")


def stop(signame: str) -> None:
    say("stopping", signal=signame)
    sys.exit(0)


def on_sigterm(signum: int, _frame: FrameType | None) -> None:
    global _terminating
    if _busy is not None:
        if not _terminating:
            say("stopping-deferred", signal=signal.Signals(signum).name, waiting_for=_busy)
        _terminating = True
        return
    stop(signal.Signals(signum).name)


def main() -> int:
    signal.signal(signal.SIGTERM, on_sigterm)
    report_boot()
    if wait_for_agent():
        wait_until_settled()
    failed_units()
    run_commands()
    return 0


if __name__ == "__main__":
    sys.exit(main())
