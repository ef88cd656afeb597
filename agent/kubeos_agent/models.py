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

from .config import HealthConfig

SHA256_PATTERN = r"^(sha256:)?[0-9a-fA-F]{64}$"
CONTAINER_IMAGE_TYPES = ("docker", "containerd")
# A container image reference as Docker, Podman and KubeOS write it: [registry[:port]/]repository[:tag][@sha256:…].
# The collection's module_utils.oci parses it precisely; this only keeps nonsense out of the playbook run.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
IMAGE_REFERENCE = re.compile(
    rf"^(?:(?:{_LABEL}(?:\.{_LABEL})*|\[[0-9A-Fa-f:.]+\])(?::[0-9]{{1,5}})?/)?"
    rf"{_COMPONENT}(?:/{_COMPONENT})*"
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?"
    r"(?:@sha256:(?P<digest>[0-9a-fA-F]{64}))?$"
)
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
    CONFIGURE = "configure"
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
    # imagetype disk: the image URL. docker/containerd: containerimage, a container image whose root
    # filesystem is the OS, pulled from its registry over HTTPS by digest (checksum is the image digest);
    # KubeOS's CRD requires both fields, so the one the imagetype does not use is ignored.
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
        if self.imagetype in CONTAINER_IMAGE_TYPES:
            self._check_container_image()
            return
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

    def _check_container_image(self) -> None:
        kind = self.imagetype
        if not self.containerimage:
            raise RequestError(
                "containerimage",
                f"containerimage is required for imagetype {kind!r}: registry.example.com/kubeos/os:TAG or "
                "…/os@sha256:DIGEST",
            )
        if "://" in self.containerimage:
            raise RequestError(
                "containerimage",
                "give the image without a scheme: registry.example.com[:port]/repository[:tag][@sha256:digest] "
                "(the registry is always reached over https)",
            )
        match = IMAGE_REFERENCE.match(self.containerimage)
        if match is None:
            raise RequestError(
                "containerimage",
                f"{self.containerimage!r} is not an image reference: registry.example.com[:port]/repository"
                "[:tag][@sha256:digest] (lower-case repository, only sha256 digests, no credentials)",
            )
        pinned = match.group("digest")
        if pinned and pinned.lower() != self.sha256:
            raise RequestError(
                "checksum",
                f"containerimage pins sha256:{pinned.lower()} but checksum is sha256:{self.sha256}; "
                "for a container image the checksum is the image digest: they must be the same",
            )
        if "format" in self.model_fields_set:
            raise RequestError(
                "format", f"format only applies to imagetype 'disk'; a {kind} image's layers are always extracted"
            )
        if self.mtls:
            for name in ("clientcert", "clientkey"):
                if not getattr(self, name):
                    raise RequestError(name, f"{name} is required when mtls is true")
        else:
            for name in ("clientcert", "clientkey"):
                if getattr(self, name):
                    raise RequestError(name, f"{name} is only used with mtls: true")

    @property
    def is_container_image(self) -> bool:
        return self.imagetype in CONTAINER_IMAGE_TYPES

    @property
    def image_src(self) -> str:
        """What kubeos.os.slot_write gets as ``src``: the image URL, or ``oci://`` and the container image."""
        return f"oci://{self.containerimage}" if self.is_container_image else self.imageurl

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
    # Health checks for this upgrade's trial boot (the OS object's ``healthchecks``), run after the reboot
    # together with the agent's own; a ``deadline``/``interval`` given here replaces the configured one.
    # Certificate files of HTTP checks are names inside the certificate directory, like ``mtls``'s.
    health: HealthConfig | None = None


class RollbackRequest(_Request):
    """Make the other slot the committed one (only when it is bootable), then reboot into it."""

    operation: Literal["rollback"]
    reboot: bool = True


class MarkGoodRequest(_Request):
    """Commit the running slot: it stays the default, any trial is over."""

    operation: Literal["mark_good"]


SYSCONFIG_MODELS = (
    "kernel.sysctl",
    "kernel.sysctl.persist",
    "grub.cmdline.current",
    "grub.cmdline.next",
    "kubernetes.kubelet",
    "container.containerd",
    "pam.limits",
)
SysconfigModel = Literal[
    "kernel.sysctl",
    "kernel.sysctl.persist",
    "grub.cmdline.current",
    "grub.cmdline.next",
    "kubernetes.kubelet",
    "container.containerd",
    "pam.limits",
]


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ConfigContent(_Part):
    """``{key, value, operation}`` of a KubeOS config entry; ``value`` is any JSON value."""

    key: str = Field(min_length=1, max_length=4096)
    value: Any = None
    # KubeOS: empty (or null) adds or updates; its examples also write "add" and "update".
    operation: Literal["", "add", "update", "delete"] | None = ""


class SysConfig(_Part):
    """One KubeOS config entry: ``{model, configpath, contents}``."""

    model: SysconfigModel
    configpath: str | None = Field(default="", max_length=4096)
    contents: list[ConfigContent] | None = Field(default_factory=list, max_length=1000)


class ConfigureRequest(_Request):
    """Apply KubeOS configuration (an OS object's ``sysconfigs``: ``version`` and ``configs``) with
    kubeos.os.sysconfig; all or nothing. kubeos additions: ``dry_run`` and the service actions."""

    operation: Literal["configure"]
    version: str = Field(default="", max_length=256)
    configs: list[SysConfig] = Field(default_factory=list, max_length=100)
    dry_run: bool = False
    reload_sysctl: bool = False
    restart_kubelet: bool = False
    restart_containerd: bool = False

    def check(self) -> None:
        """What the module would refuse too, answered with 400 before anything runs."""
        for index, entry in enumerate(self.configs):
            path = entry.configpath or ""
            where = f"configs.{index}.configpath"
            if path and not path.startswith("/"):
                raise RequestError(where, f"configpath {path!r} must be an absolute path")
            if path and any(part in (".", "..") for part in path.split("/")):
                raise RequestError(where, f"configpath {path!r} must not contain '.' or '..' parts")
            if path and entry.model in ("kernel.sysctl", "grub.cmdline.current", "grub.cmdline.next"):
                raise RequestError(where, f"{entry.model} has no configpath; remove it")

    def configs_document(self) -> list[dict[str, Any]]:
        """The configs as KubeOS writes them, for the collection."""
        return [
            {
                "model": entry.model,
                "configpath": entry.configpath or "",
                "contents": [
                    {"key": c.key, "value": c.value, "operation": c.operation or ""} for c in entry.contents or []
                ],
            }
            for entry in self.configs
        ]


Request = Union[PrepareUpgradeRequest, UpgradeRequest, RollbackRequest, MarkGoodRequest, ConfigureRequest]

_MODELS: dict[str, type[_Request]] = {
    "prepare_upgrade": PrepareUpgradeRequest,
    "upgrade": UpgradeRequest,
    "rollback": RollbackRequest,
    "mark_good": MarkGoodRequest,
    "configure": ConfigureRequest,
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
    model = _MODELS.get(kind)
    if model is None:
        raise RequestError("operation", f"unknown operation {kind!r}: use one of {', '.join(_MODELS)}")
    try:
        request = model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise RequestError(_field_of(tuple(err["loc"])), _message(err)) from exc
    if isinstance(request, (PrepareUpgradeRequest, ConfigureRequest)):
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
