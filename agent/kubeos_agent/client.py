"""A small client for the agent's API over its unix socket (used by kubeosctl, tests and os-proxy)."""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import DEFAULT_SOCKET


class AgentUnreachable(Exception):
    """Nothing answers on the socket (agent not running, wrong path, no permission)."""


@dataclass
class Response:
    status: int
    body: dict[str, Any]

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def error(self) -> dict[str, Any]:
        err = self.body.get("error")
        return err if isinstance(err, dict) else {}

    @property
    def operation(self) -> dict[str, Any]:
        op = self.body.get("operation")
        return op if isinstance(op, dict) else {}


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class AgentClient:
    def __init__(self, socket_path: str | Path = DEFAULT_SOCKET, timeout: float = 30.0) -> None:
        self.socket_path = str(socket_path)
        self.timeout = timeout

    def request(self, method: str, path: str, body: dict[str, Any] | bytes | None = None) -> Response:
        data = body if isinstance(body, bytes) else json.dumps(body).encode() if body is not None else None
        conn = _UnixConnection(self.socket_path, self.timeout)
        try:
            headers = {"Content-Type": "application/json"} if data is not None else {}
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
        except (FileNotFoundError, ConnectionRefusedError, PermissionError) as exc:
            raise AgentUnreachable(f"no kubeos agent answers on {self.socket_path}: {exc.strerror}") from exc
        except (OSError, http.client.HTTPException) as exc:
            raise AgentUnreachable(f"talking to the kubeos agent on {self.socket_path} failed: {exc}") from exc
        finally:
            conn.close()
        try:
            parsed = json.loads(raw) if raw else {}
        except ValueError:
            parsed = {"error": {"code": "bad_response", "message": raw[:200].decode("utf-8", "replace")}}
        return Response(resp.status, parsed if isinstance(parsed, dict) else {"value": parsed})

    def status(self) -> Response:
        return self.request("GET", "/v1/status")

    def operations(self) -> Response:
        return self.request("GET", "/v1/operations")

    def start(self, operation: str, **fields: Any) -> Response:
        return self.request("POST", "/v1/operations", {"operation": operation, **fields})

    def get(self, op_id: str) -> Response:
        return self.request("GET", f"/v1/operations/{op_id}")

    def cancel(self, op_id: str) -> Response:
        return self.request("POST", f"/v1/operations/{op_id}/cancel")

    def wait(
        self,
        op_id: str,
        *,
        timeout: float = 3600.0,
        interval: float = 0.25,
        on_update: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Poll until the operation ended; return its last document."""
        deadline = time.monotonic() + timeout
        while True:
            resp = self.get(op_id)
            if not resp.ok:
                raise AgentUnreachable(f"cannot follow operation {op_id}: {resp.error.get('message', resp.status)}")
            op = resp.operation
            if on_update is not None:
                on_update(op)
            if op.get("state") not in ("queued", "running"):
                return op
            if time.monotonic() > deadline:
                raise TimeoutError(f"operation {op_id} still {op.get('state')} after {timeout:g}s")
            time.sleep(interval)
