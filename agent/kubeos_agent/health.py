"""Health checks after a trial boot: systemd units active, commands that exit 0, HTTP(S) probes.

Each check is retried every ``interval`` seconds until it passes or its deadline (counted from the
start of the checks) has passed: a kubelet takes a while to come up after a boot, and a check that
never passes must still end. All checks run side by side, so the slowest deadline bounds the wait.
"""

from __future__ import annotations

import http.client
import logging
import ssl
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass

from .config import CommandCheck, HealthConfig, HttpCheck, UnitCheck

log = logging.getLogger(__name__)

_OUTPUT_TAIL = 300


@dataclass
class CheckResult:
    name: str
    ok: bool
    detail: str
    attempts: int
    seconds: float

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "ok": self.ok,
            "detail": self.detail,
            "attempts": self.attempts,
            "seconds": round(self.seconds, 2),
        }


@dataclass
class _Check:
    name: str
    deadline: float
    attempt: Callable[[float], tuple[bool, str]]  # (remaining seconds) -> (ok, detail)


def _tail(text: str) -> str:
    text = " ".join(text.split())
    return text[-_OUTPUT_TAIL:]


def _run(argv: list[str], timeout: float) -> tuple[bool, str]:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError:
        return False, f"{argv[0]} not found"
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout:g}s"
    except OSError as exc:
        return False, f"cannot run {argv[0]}: {exc.strerror}"
    out = _tail(proc.stdout + " " + proc.stderr)
    if proc.returncode == 0:
        return True, out or "exit 0"
    return False, f"exit {proc.returncode}" + (f": {out}" if out else "")


def _unit(check: UnitCheck, systemctl: list[str]) -> Callable[[float], tuple[bool, str]]:
    def attempt(remaining: float) -> tuple[bool, str]:
        ok, detail = _run([*systemctl, "is-active", check.name], min(10.0, max(remaining, 1.0)))
        return ok, detail

    return attempt


def _command(check: CommandCheck) -> Callable[[float], tuple[bool, str]]:
    def attempt(remaining: float) -> tuple[bool, str]:
        return _run(list(check.argv), min(check.timeout, max(remaining, 1.0)))

    return attempt


def _http(check: HttpCheck) -> Callable[[float], tuple[bool, str]]:
    parts = urllib.parse.urlsplit(check.url)
    ctx: ssl.SSLContext | None = None
    if parts.scheme == "https":
        ctx = ssl.create_default_context(cafile=str(check.cacert) if check.cacert else None)
        if check.clientcert:
            ctx.load_cert_chain(str(check.clientcert), str(check.clientkey) if check.clientkey else None)
    target = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))

    def attempt(remaining: float) -> tuple[bool, str]:
        timeout = min(check.timeout, max(remaining, 1.0))
        conn: http.client.HTTPConnection
        if ctx is not None:
            conn = http.client.HTTPSConnection(parts.hostname or "", parts.port, timeout=timeout, context=ctx)
        else:
            conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=timeout)
        try:
            conn.request("GET", target, headers={"User-Agent": "kubeos-agent-health"})
            response = conn.getresponse()
            body = response.read(_OUTPUT_TAIL).decode("utf-8", "replace")
        except (OSError, http.client.HTTPException) as exc:
            return False, f"GET {check.url}: {exc}"
        finally:
            conn.close()
        ok = response.status == check.expect_status
        return ok, f"GET {check.url}: {response.status}" + (f" {_tail(body)}" if body.strip() else "")

    return attempt


def build(config: HealthConfig, systemctl: list[str]) -> list[_Check]:
    checks: list[_Check] = []
    for unit in config.units:
        checks.append(_Check(f"unit {unit.name}", unit.deadline or config.deadline, _unit(unit, systemctl)))
    for cmd in config.commands:
        name = cmd.name or "command " + " ".join(cmd.argv)
        checks.append(_Check(name, cmd.deadline or config.deadline, _command(cmd)))
    for probe in config.http:
        checks.append(_Check(probe.name or f"http {probe.url}", probe.deadline or config.deadline, _http(probe)))
    return checks


def run(
    config: HealthConfig,
    systemctl: list[str],
    *,
    should_stop: Callable[[], bool] = lambda: False,
    on_result: Callable[[CheckResult], None] | None = None,
) -> list[CheckResult]:
    """Run every check until it passes or its deadline passes; return one result per check."""
    checks = build(config, systemctl)
    results: list[CheckResult | None] = [None] * len(checks)
    start = time.monotonic()

    def work(index: int, check: _Check) -> None:
        attempts = 0
        ok, detail = False, "not run"
        while True:
            remaining = check.deadline - (time.monotonic() - start)
            attempts += 1
            try:
                ok, detail = check.attempt(remaining)
            except Exception as exc:  # a broken probe is a failed check, not a crashed agent
                ok, detail = False, f"check failed to run: {exc}"
            remaining = check.deadline - (time.monotonic() - start)
            if ok or should_stop() or remaining <= 0:
                break
            time.sleep(min(config.interval, max(remaining, 0.0)))
        result = CheckResult(check.name, ok, detail, attempts, time.monotonic() - start)
        results[index] = result
        log.info(
            "health check passed" if ok else "health check failed",
            extra={"fields": {"check": check.name, "detail": detail, "attempts": attempts}},
        )
        if on_result is not None:
            on_result(result)

    threads = [threading.Thread(target=work, args=(i, c), name=f"health-{i}") for i, c in enumerate(checks)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [r for r in results if r is not None]
