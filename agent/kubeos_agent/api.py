"""The agent's HTTP+JSON API on a unix socket (mode 0600, owned by root; peers checked by SO_PEERCRED).

    GET  /v1/status                    slots, versions, GRUB state, current operation, last upgrade
    GET  /v1/operations                recent operations (oldest first)
    POST /v1/operations                start one: {"operation": "prepare_upgrade", ...}  -> 202
    GET  /v1/operations/{id}           phase, progress, recent events, result or error
    POST /v1/operations/{id}/cancel    ask a running operation to stop                   -> 202

Errors are ``{"error": {"code": …, "message": …, "field": …}}``: 400 names the field, 409 carries the
running operation, 404 for unknown operations and paths.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import logging
import os
import socket
import socketserver
import stat
import struct
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import __version__
from .models import OperationKind, RequestError, isotime, parse_request
from .operations import Busy, Conflict, NotFound, OperationManager

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024
RECENT_EVENTS = 20


@dataclass
class Reply:
    status: int
    body: dict[str, Any]


def _error(status: int, code: str, message: str, **extra: Any) -> Reply:
    return Reply(status, {"error": {"code": code, "message": message, **extra}})


class Api:
    """Routing and the JSON documents; no sockets here, so it can be driven directly."""

    def __init__(self, manager: OperationManager) -> None:
        self.manager = manager
        self.started = time.time()

    def handle(self, method: str, raw_path: str, body: bytes) -> Reply:
        path = urllib.parse.urlsplit(raw_path).path.rstrip("/") or "/"
        parts = path.split("/")[1:]
        if parts[:1] != ["v1"]:
            return _error(404, "not_found", f"no such path {path}; the API lives under /v1")
        route = parts[1:]
        try:
            if route == ["status"]:
                return self._only(method, "GET") or self.status()
            if route == ["operations"]:
                if method == "GET":
                    return self.list_operations()
                return self._only(method, "POST") or self.submit(body)
            if len(route) == 2 and route[0] == "operations":
                return self._only(method, "GET") or self.operation(route[1])
            if len(route) == 3 and route[0] == "operations" and route[2] == "cancel":
                return self._only(method, "POST") or self.cancel(route[1])
        except NotFound as exc:
            return _error(404, "not_found", str(exc))
        return _error(404, "not_found", f"no such path {path}")

    @staticmethod
    def _only(method: str, allowed: str) -> Reply | None:
        if method != allowed:
            return _error(405, "method_not_allowed", f"use {allowed}")
        return None

    def status(self) -> Reply:
        manager = self.manager
        disk = manager.disk(refresh=True)
        current = manager.current()
        last_upgrade = manager.journal.last_of(OperationKind.UPGRADE)
        last_op = next(iter(reversed(manager.recent(1))), None)
        body: dict[str, Any] = {
            "agent": {"version": __version__, "pid": os.getpid(), "started": isotime(self.started)},
            "disk": disk.view.to_dict() if disk.view else None,
            "disk_read_at": isotime(disk.view.taken) if disk.view else None,
            "disk_stale": disk.stale,
            "disk_error": disk.error,
            "current_operation": manager.describe(current, events=5) if current else None,
            "last_operation": _summary(manager.describe(last_op, events=0)) if last_op else None,
            "last_upgrade": _summary(manager.describe(last_upgrade, events=0)) if last_upgrade else None,
        }
        return Reply(200, body)

    def list_operations(self) -> Reply:
        ops = self.manager.recent(50)
        return Reply(200, {"operations": [_summary(self.manager.describe(op, events=0)) for op in ops]})

    def submit(self, body: bytes) -> Reply:
        try:
            request = parse_request(body)
            op = self.manager.submit(request)
        except RequestError as exc:
            return _error(400, "bad_request", exc.message, field=exc.field)
        except Busy as exc:
            running = self.manager.describe(exc.running, events=5)
            return _error(409, "busy", str(exc), running=running)
        except Conflict as exc:
            return _error(409, "conflict", str(exc))
        return Reply(202, {"operation": self.manager.describe(op, events=RECENT_EVENTS)})

    def operation(self, op_id: str) -> Reply:
        op = self.manager.get(op_id)
        return Reply(200, {"operation": self.manager.describe(op, events=RECENT_EVENTS)})

    def cancel(self, op_id: str) -> Reply:
        try:
            op = self.manager.cancel(op_id)
        except Conflict as exc:
            return _error(409, "conflict", str(exc))
        return Reply(202, {"operation": self.manager.describe(op, events=RECENT_EVENTS)})


def _summary(op: dict[str, Any]) -> dict[str, Any]:
    keys = ("id", "kind", "state", "phase", "created", "finished", "error", "outcome", "outcome_detail", "result")
    return {k: op.get(k) for k in keys}


# --- the socket ------------------------------------------------------------------------------------------


def _peer_uid(sock: socket.socket) -> tuple[int, int]:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _gid = struct.unpack("3i", creds)
    return pid, uid


class _Handler(http.server.BaseHTTPRequestHandler):
    server: AgentServer
    protocol_version = "HTTP/1.1"
    server_version = f"kubeos-agent/{__version__}"

    def address_string(self) -> str:
        return "unix-socket"

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the request is logged once, structured, by _dispatch

    def _send(self, reply: Reply) -> None:
        data = json.dumps(reply.body, indent=1).encode("utf-8") + b"\n"
        self.send_response(reply.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)
        self.close_connection = True

    def _dispatch(self, method: str) -> None:
        try:
            pid, uid = _peer_uid(self.connection)
        except OSError:
            pid, uid = -1, -1
        if uid not in self.server.allowed_uids:
            log.warning("refused a client", extra={"fields": {"pid": pid, "uid": uid}})
            self._send(_error(403, "forbidden", f"uid {uid} may not use the kubeos agent"))
            return
        length_text = self.headers.get("Content-Length", "0")
        try:
            length = int(length_text)
        except ValueError:
            self._send(_error(400, "bad_request", "invalid Content-Length", field="body"))
            return
        if length > MAX_BODY:
            self._send(_error(413, "too_large", f"the request body is limited to {MAX_BODY} bytes", field="body"))
            return
        body = self.rfile.read(length) if length > 0 else b""
        try:
            reply = self.server.api.handle(method, self.path, body)
        except Exception as exc:
            log.exception("request failed", extra={"fields": {"method": method, "path": self.path}})
            reply = _error(500, "internal", f"internal error in the agent: {exc!r}")
        # Polling GETs would drown the journal; changes and refusals are worth an info line.
        level = logging.DEBUG if method == "GET" and reply.status < 400 else logging.INFO
        log.log(
            level,
            "request",
            extra={"fields": {"method": method, "path": self.path, "status": reply.status, "peer_pid": pid}},
        )
        self._send(reply)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")


class AgentServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    allow_reuse_address = False

    def __init__(self, path: Path, api: Api, allowed_uids: list[int]) -> None:
        self.api = api
        self.allowed_uids = set(allowed_uids)
        self.socket_path = path
        self._bound: tuple[int, int] | None = None  # (st_dev, st_ino) of the socket file this server made
        super().__init__(str(path), _Handler)

    def server_bind(self) -> None:
        path = self.socket_path
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        _remove_stale(path)
        # Created 0600 from the start (no window in which others could connect), then made sure of.
        old = os.umask(0o177)
        try:
            self.socket.bind(str(path))
        finally:
            os.umask(old)
        st = os.lstat(path)
        self._bound = (st.st_dev, st.st_ino)
        os.chmod(path, 0o600)
        if os.geteuid() == 0:
            os.chown(path, 0, 0)

    def server_close(self) -> None:
        super().server_close()
        # Only our own socket file: a server that failed to bind must not remove another agent's.
        with contextlib.suppress(OSError):
            st = os.lstat(self.socket_path)
            if self._bound == (st.st_dev, st.st_ino) and stat.S_ISSOCK(st.st_mode):
                os.unlink(self.socket_path)


class SocketInUse(OSError):
    """Another agent listens on the socket."""


def _remove_stale(path: Path) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketInUse(f"{path} exists and is not a socket; remove it or configure another socket_path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        os.unlink(path)  # nobody listens: left over from an agent that died
        return
    finally:
        probe.close()
    raise SocketInUse(f"another kubeos agent is listening on {path}")
