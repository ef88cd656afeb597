"""What crosses the agent's boundary: typed requests (validated strictly) and the operation record.

Requests are pydantic models with ``extra="forbid"`` and ``strict=True``: an unknown field, a string
where a boolean belongs, or a malformed checksum is a :class:`RequestError` that names the field, and
the API answers 400 before anything is written. Field names of ``prepare_upgrade`` are KubeOS's
(``imageurl``, ``checksum``, ``flagSafe``, ``mtls``, ``cacert``, …) so the proxy passes an OS object
through unchanged.
"""

from __future__ import annotations

import datetime
import enum
import json
import re
import time
import urllib.parse
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

SHA256_PATTERN = r"^(sha256:)?[0-9a-fA-F]{64}$"
MAX_EVENTS = 50


class RequestError(Exception):
    """A request that cannot be accepted; ``field`` names the offending field (400)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.message = message


class OperationKind(enum.StrEnum):
    PREPARE_UPGRADE = "prepare_upgrade"
    UPGRADE = "upgrade"
    ROLLBACK = "rollback"
    MARK_GOOD = "mark_good"
    # Started by the agent itself after a boot: health checks, then commit or roll back.
    VERIFY_UPGRADE = "verify_upgrade"


class OperationState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"
    # The agent died (or the node went down) while the operation ran.
    INTERRUPTED = "interrupted"

    @property
    def final(self) -> bool:
        return self not in (OperationState.QUEUED, OperationState.RUNNING)


class Outcome(enum.StrEnum):
    """Where an upgrade (or rollback) stands across the reboot it needs."""

    PENDING_REBOOT = "pending-reboot"
    COMMITTED = "committed"  # trial slot booted, health checks passed, slot committed
    ROLLED_BACK = "rolled-back"  # trial slot booted, health checks failed, old slot armed again
    FELL_BACK = "fell-back"  # GRUB used up the tries and booted the old slot by itself
    ABANDONED = "abandoned"  # the trial was cleared by something else before it was booted
    SWITCHED = "switched"  # a rollback: the node runs the slot it rolled back to


# --- requests ---------------------------------------------------------------------------------------


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    def redacted(self) -> dict[str, Any]:
        """The request as recorded in the journal and shown by the API: nothing secret in it."""
        return self.model_dump()


def _redact_url(url: str) -> str:
    """Drop credentials and query strings (pre-signed URLs carry tokens there)."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    netloc = parts.hostname or ""
    if parts.port is not None:
        netloc += f":{parts.port}"
    query = "<redacted>" if parts.query else ""
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, ""))


class PrepareUpgradeRequest(_Request):
    """Fetch, verify and write an OS image into the inactive slot (KubeOS field names)."""

    operation: Literal["prepare_upgrade"]
    version: str = Field(default="", max_length=256)
    imagetype: Literal["disk", "docker", "containerd"] = "disk"
    imageurl: str = Field(default="", max_length=4096)
    containerimage: str = Field(default="", max_length=1024)
    checksum: str = Field(pattern=SHA256_PATTERN)
    flagSafe: bool = False
    mtls: bool = False
    cacert: str = Field(default="", max_length=1024)
    clientcert: str = Field(default="", max_length=1024)
    clientkey: str = Field(default="", max_length=1024)
    # kubeos extension: a root filesystem archive instead of a filesystem image.
    format: Literal["raw", "tar"] = "raw"

    def check(self) -> None:
        """Rules across fields; raise RequestError naming the field to fix."""
        if self.imagetype != "disk":
            raise RequestError(
                "imagetype",
                f"imagetype {self.imagetype!r} (a container image) is not supported yet by this agent; "
                "publish the OS as a disk image and use imagetype 'disk' with imageurl",
            )
        if not self.imageurl:
            raise RequestError("imageurl", "imageurl is required for imagetype 'disk'")
        try:
            parts = urllib.parse.urlsplit(self.imageurl)
        except ValueError as exc:
            raise RequestError("imageurl", f"not a URL: {exc}") from exc
        scheme = parts.scheme.lower()
        if scheme not in ("https", "http", "file"):
            raise RequestError("imageurl", "use an https:// URL (http:// only with flagSafe, or file:///path)")
        if scheme in ("https", "http") and not parts.hostname:
            raise RequestError("imageurl", "the URL has no host")
        if scheme == "file" and not parts.path.startswith("/"):
            raise RequestError("imageurl", "a file URL needs an absolute path: file:///path/to/image")
        if parts.username is not None or parts.password is not None:
            raise RequestError("imageurl", "credentials in the URL are refused; use mtls with client certificates")
        if scheme == "http" and not self.flagSafe:
            raise RequestError(
                "flagSafe",
                "imageurl is plain http://: the image would travel unauthenticated; use https://, "
                "or set flagSafe: true if you accept that",
            )
        if self.mtls:
            if scheme != "https":
                raise RequestError("mtls", "mutual TLS needs an https:// imageurl")
            for name in ("clientcert", "clientkey"):
                if not getattr(self, name):
                    raise RequestError(name, f"{name} is required when mtls is true")
        else:
            for name in ("clientcert", "clientkey"):
                if getattr(self, name):
                    raise RequestError(name, f"{name} is only used with mtls: true")
        if self.cacert and scheme != "https":
            raise RequestError("cacert", "cacert is only used with an https:// imageurl")

    @property
    def sha256(self) -> str:
        return self.checksum.lower().removeprefix("sha256:")

    def redacted(self) -> dict[str, Any]:
        data = self.model_dump()
        data["imageurl"] = _redact_url(self.imageurl) if self.imageurl else ""
        return data


class UpgradeRequest(_Request):
    """Arm a trial boot of the prepared slot, then reboot into it."""

    operation: Literal["upgrade"]
    # Boots the trial slot gets before GRUB falls back; default from the agent's configuration.
    tries: int | None = Field(default=None, ge=1, le=9)
    reboot: bool = True
    # When given, the prepared slot must hold this version (VERSION_ID or PRETTY_NAME).
    version: str = Field(default="", max_length=256)


class RollbackRequest(_Request):
    """Make the other slot the committed one (only when it is bootable), then reboot into it."""

    operation: Literal["rollback"]
    reboot: bool = True


class MarkGoodRequest(_Request):
    """Commit the running slot: it stays the default, any trial is over."""

    operation: Literal["mark_good"]


Request = Union[PrepareUpgradeRequest, UpgradeRequest, RollbackRequest, MarkGoodRequest]

_MODELS: dict[str, type[_Request]] = {
    "prepare_upgrade": PrepareUpgradeRequest,
    "upgrade": UpgradeRequest,
    "rollback": RollbackRequest,
    "mark_good": MarkGoodRequest,
}


def _field_of(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc)


def _message(err: Any) -> str:
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        return "unknown field"
    if kind == "missing":
        return "field required"
    if kind == "string_pattern_mismatch" and err.get("loc", ("",))[0] == "checksum":
        return "checksum must be the sha256 of the image: 64 hex digits, optionally prefixed with 'sha256:'"
    return str(err.get("msg", "invalid value"))


def parse_request(body: bytes) -> Request:
    """Decode and validate a POST /v1/operations body."""
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError("body", f"not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise RequestError("body", "the request must be a JSON object with an 'operation' field")
    kind = data.get("operation")
    if kind is None:
        raise RequestError("operation", "field required: one of " + ", ".join(_MODELS))
    if not isinstance(kind, str):
        raise RequestError("operation", "must be a string: one of " + ", ".join(_MODELS))
    if kind == "configure":
        raise RequestError(
            "operation",
            "configure needs kubeos.os.sysconfig, which this agent's collection does not have yet",
        )
    model = _MODELS.get(kind)
    if model is None:
        raise RequestError("operation", f"unknown operation {kind!r}: use one of {', '.join(_MODELS)}")
    try:
        request = model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise RequestError(_field_of(tuple(err["loc"])), _message(err)) from exc
    if isinstance(request, PrepareUpgradeRequest):
        request.check()
    return request  # type: ignore[return-value]


# --- the operation record ---------------------------------------------------------------------------


def isotime(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.datetime.fromtimestamp(ts, tz=datetime.UTC).isoformat(timespec="milliseconds")


def parse_isotime(text: str | None) -> float | None:
    if not text:
        return None
    return datetime.datetime.fromisoformat(text).timestamp()


@dataclass
class Progress:
    phase: str = ""
    bytes_done: int | None = None
    bytes_total: int | None = None

    @property
    def percent(self) -> float | None:
        if self.bytes_done is None or not self.bytes_total:
            return None
        return round(100.0 * min(self.bytes_done, self.bytes_total) / self.bytes_total, 1)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "percent": self.percent}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Progress:
        return cls(
            phase=str(data.get("phase", "")),
            bytes_done=data.get("bytes_done"),
            bytes_total=data.get("bytes_total"),
        )


@dataclass
class Event:
    time: float
    kind: str
    message: str
    task: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"time": isotime(self.time), "kind": self.kind, "task": self.task, "message": self.message}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Event:
        return cls(
            time=parse_isotime(data.get("time")) or 0.0,
            kind=str(data.get("kind", "")),
            message=str(data.get("message", "")),
            task=str(data.get("task", "")),
        )


@dataclass
class Operation:
    id: str
    kind: OperationKind
    request: dict[str, Any]
    state: OperationState = OperationState.QUEUED
    phase: str = "queued"
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    progress: Progress = field(default_factory=Progress)
    events: list[Event] = field(default_factory=list)
    result: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    cancel_requested: bool = False
    outcome: Outcome | None = None
    outcome_detail: str | None = None
    artifacts: str | None = None
    agent_pid: int | None = None

    def add_event(self, kind: str, message: str, task: str = "") -> None:
        self.events.append(Event(time.time(), kind, message, task))
        del self.events[:-MAX_EVENTS]

    def to_dict(self, *, events: int | None = None) -> dict[str, Any]:
        shown = self.events if events is None else self.events[-events:] if events else []
        return {
            "id": self.id,
            "kind": self.kind.value,
            "state": self.state.value,
            "phase": self.phase,
            "request": self.request,
            "created": isotime(self.created),
            "started": isotime(self.started),
            "finished": isotime(self.finished),
            "progress": self.progress.to_dict(),
            "events": [e.to_dict() for e in shown],
            "result": self.result,
            "error": self.error,
            "cancel_requested": self.cancel_requested,
            "outcome": self.outcome.value if self.outcome else None,
            "outcome_detail": self.outcome_detail,
            "artifacts": self.artifacts,
            "agent_pid": self.agent_pid,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Operation:
        outcome = data.get("outcome")
        return cls(
            id=str(data["id"]),
            kind=OperationKind(data["kind"]),
            request=dict(data.get("request") or {}),
            state=OperationState(data.get("state", "interrupted")),
            phase=str(data.get("phase", "")),
            created=parse_isotime(data.get("created")) or 0.0,
            started=parse_isotime(data.get("started")),
            finished=parse_isotime(data.get("finished")),
            progress=Progress.from_dict(data.get("progress") or {}),
            events=[Event.from_dict(e) for e in data.get("events") or []],
            result=dict(data.get("result") or {}),
            error=data.get("error"),
            cancel_requested=bool(data.get("cancel_requested", False)),
            outcome=Outcome(outcome) if outcome else None,
            outcome_detail=data.get("outcome_detail"),
            artifacts=data.get("artifacts"),
            agent_pid=data.get("agent_pid"),
        )


def new_operation_id(now: float | None = None) -> str:
    """Sortable and unique: ``op-20260101T120000Z-3f9a1c``."""
    import secrets

    stamp = datetime.datetime.fromtimestamp(now or time.time(), tz=datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"op-{stamp}-{secrets.token_hex(3)}"


OPERATION_ID = re.compile(r"^op-\d{8}T\d{6}Z-[0-9a-f]{6}$")
