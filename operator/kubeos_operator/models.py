"""Typed views of the OS and OSInstance custom resources (spec and status), and of the Nodes they act on.

Field names on the wire are KubeOS's (``osversion``, ``flagSafe``, ``nodeselector`` …) for everything KubeOS
has; kubeos's additions are optional and camel-cased in status. ``from_dict`` reads what the API server
returns (defaults applied by the CRD schema may be absent in unit tests, so every field has the CRD's
default here too); ``to_dict`` writes what the CRD accepts. Values that do not fit are not guessed: the
reader keeps what it can and :func:`OSSpec.problems` says what is wrong, so the operator can report it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from . import names

OPSTYPES = ("upgrade", "config", "rollback")
IMAGETYPES = ("docker", "disk", "containerd")
EXECUTION_MODES = ("serial", "parallel")

DEFAULT_TIMEINTERVAL = 15
DEFAULT_MAXRETRIES = 3
DEFAULT_DRAINTIMEOUT = 600


def _str(data: dict[str, Any], key: str, default: str = "") -> str:
    value = data.get(key)
    return value if isinstance(value, str) else default


def _bool(data: dict[str, Any], key: str, default: bool = False) -> bool:
    value = data.get(key)
    return value if isinstance(value, bool) else default


def _int(data: dict[str, Any], key: str, default: int | None = None) -> int | None:
    value = data.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _dict(data: dict[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key)
    return value if isinstance(value, dict) else {}


def _list(data: dict[str, Any], key: str) -> list[Any]:
    value = data.get(key)
    return value if isinstance(value, list) else []


# --- configuration (sysconfigs / upgradeconfigs) ------------------------------------------------------------


@dataclass(frozen=True)
class Content:
    """``{key, value, operation}``: operation empty (add or update) or ``delete``; value any JSON value."""

    key: str
    value: Any = None
    operation: str = ""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Content:
        return cls(key=_str(data, "key"), value=data.get("value"), operation=_str(data, "operation"))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"key": self.key}
        if self.value is not None:
            out["value"] = self.value
        if self.operation:
            out["operation"] = self.operation
        return out


@dataclass(frozen=True)
class SysConfig:
    """One config entry: ``{model, configpath, contents}``."""

    model: str
    configpath: str = ""
    contents: tuple[Content, ...] = ()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SysConfig:
        return cls(
            model=_str(data, "model"),
            configpath=_str(data, "configpath"),
            contents=tuple(Content.from_dict(c) for c in _list(data, "contents") if isinstance(c, dict)),
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.model}
        if self.configpath:
            out["configpath"] = self.configpath
        out["contents"] = [c.to_dict() for c in self.contents]
        return out


@dataclass(frozen=True)
class ConfigSet:
    """``sysconfigs`` / ``upgradeconfigs``: a version and its config entries."""

    version: str = ""
    configs: tuple[SysConfig, ...] = ()

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> ConfigSet:
        data = data or {}
        return cls(
            version=_str(data, "version"),
            configs=tuple(SysConfig.from_dict(c) for c in _list(data, "configs") if isinstance(c, dict)),
        )

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "configs": [c.to_dict() for c in self.configs]}

    @property
    def empty(self) -> bool:
        return not self.version and not self.configs

    def with_cmdline_swapped(self) -> ConfigSet:
        """The same set with ``grub.cmdline.current`` and ``grub.cmdline.next`` exchanged.

        An upgrade applies its sysconfigs after the slot flip, so the slot the user called "next" (the one
        being installed) is the running one by then, and the old "current" is the other one.
        """
        swap = {"grub.cmdline.current": "grub.cmdline.next", "grub.cmdline.next": "grub.cmdline.current"}
        return ConfigSet(
            version=self.version,
            configs=tuple(
                SysConfig(model=swap.get(c.model, c.model), configpath=c.configpath, contents=c.contents)
                for c in self.configs
            ),
        )


# --- OS --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TimeWindow:
    """``HH:MM:SS`` or ``YYYY-MM-DD HH:MM:SS``, both in the same form; both empty = always open."""

    starttime: str = ""
    endtime: str = ""

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> TimeWindow:
        data = data or {}
        return cls(starttime=_str(data, "starttime"), endtime=_str(data, "endtime"))

    def to_dict(self) -> dict[str, Any]:
        return {"starttime": self.starttime, "endtime": self.endtime}

    @property
    def always(self) -> bool:
        return not self.starttime.strip() and not self.endtime.strip()


@dataclass(frozen=True)
class HealthChecks:
    """kubeos: health checks the agent runs after the trial boot before it commits the new slot.

    The shape of the agent's ``health`` configuration (docs/agent.md): systemd units that must be active,
    commands that must exit 0, HTTP endpoints that must answer; ``deadline`` seconds for all of them.
    """

    deadline: int | None = None
    units: tuple[str, ...] = ()
    commands: tuple[dict[str, Any], ...] = ()
    http: tuple[dict[str, Any], ...] = ()

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> HealthChecks:
        data = data or {}
        return cls(
            deadline=_int(data, "deadline"),
            units=tuple(u for u in _list(data, "units") if isinstance(u, str)),
            commands=tuple(c for c in _list(data, "commands") if isinstance(c, dict)),
            http=tuple(h for h in _list(data, "http") if isinstance(h, dict)),
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.deadline is not None:
            out["deadline"] = self.deadline
        if self.units:
            out["units"] = list(self.units)
        if self.commands:
            out["commands"] = list(self.commands)
        if self.http:
            out["http"] = list(self.http)
        return out

    @property
    def empty(self) -> bool:
        return not self.to_dict()


@dataclass(frozen=True)
class OSSpec:
    """``OS.spec``: KubeOS's fields, then kubeos's optional additions."""

    osversion: str = ""
    imageurl: str = ""
    checksum: str = ""
    imagetype: str = "disk"
    containerimage: str = ""
    opstype: str = "upgrade"
    maxunavailable: int = 1
    flagSafe: bool = False
    mtls: bool = False
    cacert: str = ""
    clientcert: str = ""
    clientkey: str = ""
    evictpodforce: bool = False
    sysconfigs: ConfigSet = field(default_factory=ConfigSet)
    upgradeconfigs: ConfigSet = field(default_factory=ConfigSet)
    nodeselector: str = names.SELECT_NO_LABEL
    timewindow: TimeWindow = field(default_factory=TimeWindow)
    timeinterval: int = DEFAULT_TIMEINTERVAL
    executionmode: str = "parallel"
    # kubeos additions.
    paused: bool = False
    maxfailures: int | None = None
    draintimeout: int = DEFAULT_DRAINTIMEOUT
    maxretries: int = DEFAULT_MAXRETRIES
    allowcontrolplane: bool = False
    healthchecks: HealthChecks = field(default_factory=HealthChecks)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> OSSpec:
        data = data or {}
        return cls(
            osversion=_str(data, "osversion"),
            imageurl=_str(data, "imageurl"),
            checksum=_str(data, "checksum"),
            imagetype=_str(data, "imagetype", "disk"),
            containerimage=_str(data, "containerimage"),
            opstype=_str(data, "opstype", "upgrade"),
            maxunavailable=_int(data, "maxunavailable", 1) or 0,
            flagSafe=_bool(data, "flagSafe"),
            mtls=_bool(data, "mtls"),
            cacert=_str(data, "cacert"),
            clientcert=_str(data, "clientcert"),
            clientkey=_str(data, "clientkey"),
            evictpodforce=_bool(data, "evictpodforce"),
            sysconfigs=ConfigSet.from_dict(_dict(data, "sysconfigs")),
            upgradeconfigs=ConfigSet.from_dict(_dict(data, "upgradeconfigs")),
            nodeselector=_str(data, "nodeselector", names.SELECT_NO_LABEL) or names.SELECT_NO_LABEL,
            timewindow=TimeWindow.from_dict(_dict(data, "timewindow")),
            timeinterval=_int(data, "timeinterval", DEFAULT_TIMEINTERVAL) or 0,
            executionmode=_str(data, "executionmode", "parallel") or "parallel",
            paused=_bool(data, "paused"),
            maxfailures=_int(data, "maxfailures"),
            draintimeout=_int(data, "draintimeout", DEFAULT_DRAINTIMEOUT) or 0,
            maxretries=_int(data, "maxretries", DEFAULT_MAXRETRIES) or 0,
            allowcontrolplane=_bool(data, "allowcontrolplane"),
            healthchecks=HealthChecks.from_dict(_dict(data, "healthchecks")),
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "osversion": self.osversion,
            "imageurl": self.imageurl,
            "checksum": self.checksum,
            "imagetype": self.imagetype,
            "containerimage": self.containerimage,
            "opstype": self.opstype,
            "maxunavailable": self.maxunavailable,
            "flagSafe": self.flagSafe,
            "mtls": self.mtls,
            "cacert": self.cacert,
            "clientcert": self.clientcert,
            "clientkey": self.clientkey,
            "evictpodforce": self.evictpodforce,
            "sysconfigs": self.sysconfigs.to_dict(),
            "upgradeconfigs": self.upgradeconfigs.to_dict(),
            "nodeselector": self.nodeselector,
            "timewindow": self.timewindow.to_dict(),
            "timeinterval": self.timeinterval,
            "executionmode": self.executionmode,
            "paused": self.paused,
            "draintimeout": self.draintimeout,
            "maxretries": self.maxretries,
            "allowcontrolplane": self.allowcontrolplane,
        }
        if self.maxfailures is not None:
            out["maxfailures"] = self.maxfailures
        if not self.healthchecks.empty:
            out["healthchecks"] = self.healthchecks.to_dict()
        return out

    def problems(self) -> list[str]:
        """What makes this spec unusable, each saying what to change (empty: fine)."""
        out = []
        if self.opstype not in OPSTYPES:
            out.append(f"opstype {self.opstype!r} is not one of {', '.join(OPSTYPES)}")
        if self.executionmode not in EXECUTION_MODES:
            out.append(f"executionmode {self.executionmode!r} is not one of {', '.join(EXECUTION_MODES)}")
        if self.opstype in ("upgrade", "rollback") and not self.osversion:
            out.append(f"opstype {self.opstype} needs osversion (the PRETTY_NAME the nodes must run)")
        if self.opstype == "config" and not self.sysconfigs.version:
            out.append("opstype config needs sysconfigs.version (nodes whose applied version differs are configured)")
        if self.opstype == "upgrade" and self.imagetype not in IMAGETYPES:
            out.append(f"imagetype {self.imagetype!r} is not one of {', '.join(IMAGETYPES)}")
        if self.timeinterval < 0:
            out.append("timeinterval must not be negative")
        return out

    @property
    def target(self) -> str:
        """What a node must reach for this OS: the OS version, or the sysconfigs version for ``config``."""
        return self.sysconfigs.version if self.opstype == "config" else self.osversion


@dataclass(frozen=True)
class Condition:
    type: str
    status: str  # "True" | "False" | "Unknown"
    reason: str = ""
    message: str = ""
    lastTransitionTime: str = ""
    observedGeneration: int | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Condition:
        return cls(
            type=_str(data, "type"),
            status=_str(data, "status", "Unknown"),
            reason=_str(data, "reason"),
            message=_str(data, "message"),
            lastTransitionTime=_str(data, "lastTransitionTime"),
            observedGeneration=_int(data, "observedGeneration"),
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "type": self.type,
            "status": self.status,
            "reason": self.reason,
            "message": self.message,
            "lastTransitionTime": self.lastTransitionTime,
        }
        if self.observedGeneration is not None:
            out["observedGeneration"] = self.observedGeneration
        return out


def conditions_from(data: dict[str, Any]) -> tuple[Condition, ...]:
    return tuple(Condition.from_dict(c) for c in _list(data, "conditions") if isinstance(c, dict))


def find_condition(conditions: tuple[Condition, ...], kind: str) -> Condition | None:
    return next((c for c in conditions if c.type == kind), None)


def set_condition(
    conditions: tuple[Condition, ...],
    kind: str,
    status: bool,
    reason: str,
    message: str,
    now: str,
    generation: int | None = None,
) -> tuple[Condition, ...]:
    """Conditions with ``kind`` set; ``lastTransitionTime`` only moves when the status changes."""
    value = "True" if status else "False"
    old = find_condition(conditions, kind)
    since = old.lastTransitionTime if old is not None and old.status == value and old.lastTransitionTime else now
    new = Condition(kind, value, reason, message, since, generation)
    rest = tuple(c for c in conditions if c.type != kind)
    return (*rest, new) if old is None else tuple(new if c.type == kind else c for c in conditions)


@dataclass(frozen=True)
class OSStatus:
    """``OS.status`` (kubeos): conditions and node counts."""

    conditions: tuple[Condition, ...] = ()
    matching: int = 0
    updated: int = 0
    inProgress: int = 0
    failed: int = 0
    observedGeneration: int | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> OSStatus:
        data = data or {}
        return cls(
            conditions=conditions_from(data),
            matching=_int(data, "matching", 0) or 0,
            updated=_int(data, "updated", 0) or 0,
            inProgress=_int(data, "inProgress", 0) or 0,
            failed=_int(data, "failed", 0) or 0,
            observedGeneration=_int(data, "observedGeneration"),
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "conditions": [c.to_dict() for c in self.conditions],
            "matching": self.matching,
            "updated": self.updated,
            "inProgress": self.inProgress,
            "failed": self.failed,
        }
        if self.observedGeneration is not None:
            out["observedGeneration"] = self.observedGeneration
        return out


@dataclass(frozen=True)
class OS:
    """An OS object as read from the API."""

    name: str
    namespace: str
    spec: OSSpec
    status: OSStatus = field(default_factory=OSStatus)
    generation: int = 0
    resource_version: str = ""
    uid: str = ""

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> OS:
        meta = _dict(obj, "metadata")
        return cls(
            name=_str(meta, "name"),
            namespace=_str(meta, "namespace", "default"),
            spec=OSSpec.from_dict(_dict(obj, "spec")),
            status=OSStatus.from_dict(_dict(obj, "status")),
            generation=_int(meta, "generation", 0) or 0,
            resource_version=_str(meta, "resourceVersion"),
            uid=_str(meta, "uid"),
        )

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


# --- OSInstance ------------------------------------------------------------------------------------------------


class Phase(enum.StrEnum):
    """Where a node stands (kubeos's ``OSInstance.status.phase``)."""

    IDLE = "idle"
    PENDING = "pending"  # assigned, the proxy has not started yet
    PREPARING = "preparing"  # upgradeconfigs, the agent writes the other slot
    DRAINING = "draining"
    REBOOTING = "rebooting"
    VERIFYING = "verifying"  # back up: waiting for the agent's commit, then sysconfigs
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True)
class NamespacedName:
    name: str = ""
    namespace: str = ""

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> NamespacedName:
        data = data or {}
        return cls(name=_str(data, "name"), namespace=_str(data, "namespace"))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "namespace": self.namespace}

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}" if self.name else ""


@dataclass(frozen=True)
class OSInstanceSpec:
    nodestatus: str = "idle"
    namespacedname: NamespacedName = field(default_factory=NamespacedName)
    sysconfigs: ConfigSet = field(default_factory=ConfigSet)
    upgradeconfigs: ConfigSet = field(default_factory=ConfigSet)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> OSInstanceSpec:
        data = data or {}
        return cls(
            nodestatus=_str(data, "nodestatus", "idle") or "idle",
            namespacedname=NamespacedName.from_dict(_dict(data, "namespacedname")),
            sysconfigs=ConfigSet.from_dict(_dict(data, "sysconfigs")),
            upgradeconfigs=ConfigSet.from_dict(_dict(data, "upgradeconfigs")),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "nodestatus": self.nodestatus,
            "namespacedname": self.namespacedname.to_dict(),
            "sysconfigs": self.sysconfigs.to_dict(),
            "upgradeconfigs": self.upgradeconfigs.to_dict(),
        }


@dataclass(frozen=True)
class Progress:
    percent: float | None = None
    message: str = ""

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Progress:
        data = data or {}
        value = data.get("percent")
        percent = float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
        return cls(percent=percent, message=_str(data, "message"))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"message": self.message}
        if self.percent is not None:
            out["percent"] = self.percent
        return out


@dataclass(frozen=True)
class OSInstanceStatus:
    """KubeOS's applied ``sysconfigs``/``upgradeconfigs``, then kubeos's phase and the rest."""

    sysconfigs: ConfigSet = field(default_factory=ConfigSet)
    upgradeconfigs: ConfigSet = field(default_factory=ConfigSet)
    phase: str = Phase.IDLE.value
    # The operation the phase belongs to: "<opstype> <target>" of "<namespace>/<OS>".
    opstype: str = ""
    target: str = ""
    os: str = ""
    conditions: tuple[Condition, ...] = ()
    attempts: int = 0
    lastError: str = ""
    progress: Progress = field(default_factory=Progress)
    bootedSlot: str = ""
    bootedVersion: str = ""
    agentOperation: str = ""
    startedAt: str = ""
    finishedAt: str = ""
    lastTransitionTime: str = ""
    nextAttemptAt: str = ""

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> OSInstanceStatus:
        data = data or {}
        return cls(
            sysconfigs=ConfigSet.from_dict(_dict(data, "sysconfigs")),
            upgradeconfigs=ConfigSet.from_dict(_dict(data, "upgradeconfigs")),
            phase=_str(data, "phase", Phase.IDLE.value) or Phase.IDLE.value,
            opstype=_str(data, "opstype"),
            target=_str(data, "target"),
            os=_str(data, "os"),
            conditions=conditions_from(data),
            attempts=_int(data, "attempts", 0) or 0,
            lastError=_str(data, "lastError"),
            progress=Progress.from_dict(_dict(data, "progress")),
            bootedSlot=_str(data, "bootedSlot"),
            bootedVersion=_str(data, "bootedVersion"),
            agentOperation=_str(data, "agentOperation"),
            startedAt=_str(data, "startedAt"),
            finishedAt=_str(data, "finishedAt"),
            lastTransitionTime=_str(data, "lastTransitionTime"),
            nextAttemptAt=_str(data, "nextAttemptAt"),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "sysconfigs": self.sysconfigs.to_dict(),
            "upgradeconfigs": self.upgradeconfigs.to_dict(),
            "phase": self.phase,
            "opstype": self.opstype,
            "target": self.target,
            "os": self.os,
            "conditions": [c.to_dict() for c in self.conditions],
            "attempts": self.attempts,
            "lastError": self.lastError,
            "progress": self.progress.to_dict(),
            "bootedSlot": self.bootedSlot,
            "bootedVersion": self.bootedVersion,
            "agentOperation": self.agentOperation,
            "startedAt": self.startedAt,
            "finishedAt": self.finishedAt,
            "lastTransitionTime": self.lastTransitionTime,
            "nextAttemptAt": self.nextAttemptAt,
        }


@dataclass(frozen=True)
class OSInstance:
    name: str
    namespace: str
    spec: OSInstanceSpec = field(default_factory=OSInstanceSpec)
    status: OSInstanceStatus = field(default_factory=OSInstanceStatus)
    resource_version: str = ""

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> OSInstance:
        meta = _dict(obj, "metadata")
        return cls(
            name=_str(meta, "name"),
            namespace=_str(meta, "namespace", names.DEFAULT_OSINSTANCE_NAMESPACE),
            spec=OSInstanceSpec.from_dict(_dict(obj, "spec")),
            status=OSInstanceStatus.from_dict(_dict(obj, "status")),
            resource_version=_str(meta, "resourceVersion"),
        )

    @property
    def busy(self) -> bool:
        return self.spec.nodestatus != "idle"

    def failed_on(self, os_key: str, opstype: str, target: str) -> bool:
        """The node failed this very operation (same OS, kind and target): not to be picked again."""
        s = self.status
        return s.phase == Phase.FAILED and s.os == os_key and s.opstype == opstype and s.target == target


# --- Node ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeView:
    """What scheduling needs of a Node."""

    name: str
    labels: dict[str, str] = field(default_factory=dict)
    os_image: str = ""
    unschedulable: bool = False
    ready: bool = True
    uid: str = ""

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> NodeView:
        meta = _dict(obj, "metadata")
        spec = _dict(obj, "spec")
        status = _dict(obj, "status")
        info = _dict(status, "nodeInfo")
        ready = any(
            isinstance(c, dict) and c.get("type") == "Ready" and c.get("status") == "True"
            for c in _list(status, "conditions")
        )
        labels = {str(k): str(v) for k, v in _dict(meta, "labels").items()}
        return cls(
            name=_str(meta, "name"),
            labels=labels,
            os_image=_str(info, "osImage"),
            unschedulable=_bool(spec, "unschedulable"),
            ready=ready,
            uid=_str(meta, "uid"),
        )

    def fingerprint(self) -> tuple[Any, ...]:
        """Everything scheduling reads of this Node: when it is unchanged, a Node event changes no plan."""
        return (tuple(sorted(self.labels.items())), self.os_image, self.unschedulable, self.ready, self.uid)

    @property
    def control_plane(self) -> bool:
        return names.LABEL_CONTROL_PLANE in self.labels or names.LABEL_MASTER in self.labels

    @property
    def operation_label(self) -> str | None:
        """``upgrading`` or ``configuring`` when the node carries one."""
        for label in (names.LABEL_UPGRADING, names.LABEL_CONFIGURING):
            if label in self.labels:
                return label
        return None


def operation_label_for(opstype: str) -> str:
    return names.LABEL_CONFIGURING if opstype == "config" else names.LABEL_UPGRADING


def nodestatus_for(opstype: str) -> str:
    """KubeOS's ``nodestatus``: ``upgrade`` for upgrade and rollback, ``config`` for config."""
    return "config" if opstype == "config" else "upgrade"
