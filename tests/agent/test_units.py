"""The agent's pure parts: journal, request models, certificate names, health checks, process markers, logs."""

from __future__ import annotations

import http.server
import io
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kubeos_agent import certs, health, logs, processes
from kubeos_agent.config import HealthConfig
from kubeos_agent.journal import Journal
from kubeos_agent.models import (
    Operation,
    OperationKind,
    OperationState,
    Outcome,
    PrepareUpgradeRequest,
    RequestError,
    new_operation_id,
    parse_request,
)

# --- journal ----------------------------------------------------------------------------------------------


def make_op(
    kind: OperationKind = OperationKind.MARK_GOOD, state: OperationState = OperationState.SUCCEEDED
) -> Operation:
    op = Operation(id=new_operation_id(), kind=kind, request={"operation": kind.value}, state=state)
    time.sleep(0.002)  # distinct creation times
    return op


def test_journal_round_trips_an_operation_and_leaves_no_temporary_files(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j")
    journal.prepare()
    op = make_op(OperationKind.UPGRADE)
    op.result = {"trial_slot": "B"}
    op.outcome = Outcome.PENDING_REBOOT
    op.add_event("task", "started", "Arm")
    journal.write(op)
    again = journal.read(op.id)
    assert again is not None and again.to_dict() == op.to_dict()
    assert [p.name for p in (tmp_path / "j").iterdir()] == [f"{op.id}.json"]
    assert oct((tmp_path / "j").stat().st_mode & 0o777) == "0o700"


def test_journal_finds_unfinished_operations_and_marks_them_interrupted(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    done, running = make_op(), make_op(OperationKind.PREPARE_UPGRADE, OperationState.RUNNING)
    journal.write(done)
    journal.write(running)
    assert [op.id for op in journal.unfinished()] == [running.id]
    journal.mark_interrupted(running, "the agent died")
    record = journal.read(running.id)
    assert record is not None and record.state == OperationState.INTERRUPTED and record.error == "the agent died"
    assert record.finished is not None
    assert journal.unfinished() == []


def test_journal_prunes_old_records_but_keeps_the_last_upgrade(tmp_path: Path) -> None:
    journal = Journal(tmp_path, keep=10)
    upgrade = make_op(OperationKind.UPGRADE)
    journal.write(upgrade)
    others = [make_op() for _ in range(14)]
    for op in others:
        journal.write(op)
    journal.prune()
    kept = [op.id for op in journal.all()]
    assert len(kept) == 10 and upgrade.id in kept
    assert kept[-9:] == [op.id for op in others[-9:]]


def test_journal_skips_a_damaged_record(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    journal = Journal(tmp_path)
    op = make_op()
    journal.write(op)
    (tmp_path / "op-20200101T000000Z-000000.json").write_text("{not json")
    assert [o.id for o in journal.all()] == [op.id]


def test_journal_refuses_ids_that_are_paths(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    assert journal.read("../../etc/passwd") is None


# --- requests ---------------------------------------------------------------------------------------------


def test_prepare_upgrade_accepts_a_kubeos_os_spec_and_redacts_the_url() -> None:
    body = {
        "operation": "prepare_upgrade",
        "version": "KubeOS v2",
        "imagetype": "disk",
        "imageurl": "https://images.example/os.img?X-Amz-Signature=secret",
        "checksum": "sha256:" + "AB" * 32,
        "flagSafe": False,
        "mtls": False,
        "cacert": "",
        "clientcert": "",
        "clientkey": "",
        "containerimage": "",
    }
    request = parse_request(json.dumps(body).encode())
    assert isinstance(request, PrepareUpgradeRequest)
    assert request.sha256 == "ab" * 32
    assert request.redacted()["imageurl"] == "https://images.example/os.img?<redacted>"


def test_request_error_names_the_field() -> None:
    with pytest.raises(RequestError) as err:
        parse_request(b'{"operation": "upgrade", "tries": true}')
    assert err.value.field == "tries"


# --- certificate names -----------------------------------------------------------------------------------


def test_certificate_names_resolve_inside_the_directory_only(tmp_path: Path) -> None:
    (tmp_path / "certs" / "sub").mkdir(parents=True)
    (tmp_path / "certs" / "sub" / "ca.crt").write_text("x")
    (tmp_path / "outside.crt").write_text("x")
    os.symlink("../outside.crt", tmp_path / "certs" / "link.crt")
    base = tmp_path / "certs"
    assert certs.resolve(base, "sub/ca.crt", "cacert") == (base / "sub" / "ca.crt").resolve()
    assert certs.resolve(base, str(base / "sub" / "ca.crt"), "cacert") == (base / "sub" / "ca.crt").resolve()
    for bad in ("../outside.crt", "sub/../../outside.crt", str(tmp_path / "outside.crt"), "link.crt", "sub"):
        with pytest.raises(RequestError) as err:
            certs.resolve(base, bad, "cacert")
        assert err.value.field == "cacert"


# --- health checks ----------------------------------------------------------------------------------------


@pytest.fixture
def healthz() -> Iterator[tuple[str, list[int]]]:
    """An HTTP endpoint that answers 503 twice, then 200."""
    calls: list[int] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            calls.append(1)
            code = 200 if len(calls) > 2 else 503
            self.send_response(code)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/healthz", calls
    finally:
        server.shutdown()
        server.server_close()


def test_health_checks_retry_until_they_pass_or_their_deadline(healthz: tuple[str, list[int]], tmp_path: Path) -> None:
    url, calls = healthz
    flag = tmp_path / "ready"
    threading.Timer(0.5, flag.touch).start()
    config = HealthConfig.model_validate(
        {
            "deadline": 10,
            "interval": 0.1,
            "commands": [
                {"argv": ["test", "-e", str(flag)], "name": "becomes ready"},
                {"argv": ["false"], "name": "never", "deadline": 0.5},
                {"argv": ["sleep", "5"], "name": "hangs", "timeout": 0.3, "deadline": 0.5},
            ],
            "http": [{"url": url}],
            "units": [{"name": "missing.service", "deadline": 0.5}],
        }
    )
    started = time.monotonic()
    results = {r.name: r for r in health.run(config, ["/nonexistent/systemctl"])}
    took = time.monotonic() - started
    assert results["becomes ready"].ok and results["becomes ready"].attempts > 1
    assert not results["never"].ok and results["never"].detail == "exit 1"
    assert not results["hangs"].ok and "timed out" in results["hangs"].detail
    assert results[f"http {url}"].ok and len(calls) == 3
    assert not results["unit missing.service"].ok and "not found" in results["unit missing.service"].detail
    assert took < 5


# --- process markers --------------------------------------------------------------------------------------


def test_processes_are_found_by_their_marker_and_stopped_even_when_detached() -> None:
    marker = new_operation_id()
    env = {**os.environ, processes.MARKER_ENV: marker}
    # A child in its own session that ignores SIGINT and SIGTERM: only SIGKILL stops it.
    code = (
        "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); "
        "signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], env=env, start_new_session=True, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        assert [p.pid for p in processes.find(marker)] == [proc.pid]
        stopped = processes.stop(marker, grace=0.2)
        assert [p.pid for p in stopped] == [proc.pid]
        assert proc.wait(timeout=5) == -9
        assert processes.find(marker) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --- logs ---------------------------------------------------------------------------------------------------


def test_json_logs_carry_structured_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        logs.setup("json", "info")
        logging.getLogger("kubeos_agent.test").info("hello", extra={"fields": {"operation": "op-1", "n": 2}})
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    record = json.loads(stream.getvalue().splitlines()[-1])
    assert record["msg"] == "hello" and record["operation"] == "op-1" and record["n"] == 2
    assert record["level"] == "info" and record["logger"] == "kubeos_agent.test"
