"""The agent's configuration file (YAML), validated like the API requests: unknown keys are errors.

Everything that differs between a node and a test is here: where the socket, journal and runner
artifacts live, which disk the agent works on and which root counts as running (tests state it;
a node reads it from the kernel command line), the reboot command and the health checks.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

DEFAULT_CONFIG_PATH = Path("/etc/kubeos/agent.yaml")
CONFIG_ENV = "KUBEOS_AGENT_CONFIG"
DEFAULT_SOCKET = Path("/run/kubeos/agent.sock")

Seconds = Annotated[float, Field(gt=0, le=24 * 3600)]


class ConfigError(Exception):
    """The configuration file cannot be used; the message names the file and the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class UnitCheck(_Strict):
    """A systemd unit that must be active (``systemctl is-active``)."""

    name: str = Field(min_length=1)
    deadline: Seconds | None = None


class CommandCheck(_Strict):
    """A command that must exit 0 (run without a shell)."""

    argv: list[str] = Field(min_length=1)
    timeout: Seconds = 10.0
    deadline: Seconds | None = None
    name: str = ""


class HttpCheck(_Strict):
    """An HTTP(S) GET that must answer ``expect_status`` (kubelet's healthz, an API server's readyz)."""

    url: str = Field(pattern=r"^https?://")
    expect_status: int = Field(default=200, ge=100, le=599)
    timeout: Seconds = 5.0
    deadline: Seconds | None = None
    cacert: Path | None = None
    clientcert: Path | None = None
    clientkey: Path | None = None
    name: str = ""


class HealthConfig(_Strict):
    """Checks run after booting a trial slot. Each is retried every ``interval`` seconds until it passes
    or its deadline (``deadline`` of the check, else the default here, counted from the start) passes."""

    deadline: Seconds = 300.0
    interval: Seconds = 2.0
    units: list[UnitCheck] = Field(default_factory=list)
    commands: list[CommandCheck] = Field(default_factory=list)
    http: list[HttpCheck] = Field(default_factory=list)

    @field_validator("units", mode="before")
    @classmethod
    def _unit_names(cls, value: Any) -> Any:
        # "kubelet.service" is short for {name: kubelet.service}.
        if isinstance(value, list):
            return [{"name": item} if isinstance(item, str) else item for item in value]
        return value

    @property
    def empty(self) -> bool:
        return not (self.units or self.commands or self.http)

    def merged(self, extra: HealthConfig | None) -> HealthConfig:
        """These checks and ``extra``'s (an upgrade request's); ``extra``'s deadline and interval win when set."""
        if extra is None:
            return self
        given = extra.model_fields_set
        return HealthConfig(
            deadline=extra.deadline if "deadline" in given else self.deadline,
            interval=extra.interval if "interval" in given else self.interval,
            units=[*self.units, *extra.units],
            commands=[*self.commands, *extra.commands],
            http=[*self.http, *extra.http],
        )


def _default_playbook_binary() -> Path:
    beside = Path(sys.executable).parent / "ansible-playbook"
    if beside.exists():
        return beside
    found = shutil.which("ansible-playbook")
    return Path(found) if found else beside


class AgentConfig(_Strict):
    socket_path: Path = DEFAULT_SOCKET
    # Only these peers (SO_PEERCRED uid) may talk to the agent, on top of the socket's 0600 mode.
    allowed_uids: list[int] = Field(default_factory=lambda: [0])
    journal_dir: Path = Path("/persist/kubeos/journal")
    journal_keep: int = Field(default=200, ge=10)
    artifacts_dir: Path = Path("/persist/kubeos/runner")
    artifacts_keep: int = Field(default=10, ge=1)
    runtime_dir: Path = Path("/run/kubeos")
    cert_dir: Path = Path("/etc/KubeOS/certs")
    collections_path: Path = Path("/usr/share/ansible/collections")
    ansible_playbook: Path = Field(default_factory=_default_playbook_binary)
    python_interpreter: Path = Field(default_factory=lambda: Path(sys.executable))
    # The disk (or disk image file) holding the slots; None: the disk of the running root.
    device: str | None = None
    # The running root as on the kernel command line (PARTUUID=…, LABEL=…, /dev/…); None: /proc/cmdline.
    running_root: str | None = None
    # The tree ``configure`` (sysconfigs) writes under, as "/" (an agent in a container: the host's root
    # mounted at /host; tests and image builds: a directory). Service actions are refused when it is not "/".
    configure_root: Path = Path("/")
    reboot_command: list[str] = Field(default_factory=lambda: ["systemctl", "reboot"], min_length=1)
    systemctl_command: list[str] = Field(default_factory=lambda: ["systemctl"], min_length=1)
    trial_tries: int = Field(default=3, ge=1, le=9)
    # GET /v1/status reads the disk (mounting the other slot read-only) at most this often.
    status_max_age: float = Field(default=2.0, ge=0, le=3600)
    download_timeout: Seconds = 60.0
    # Seconds a cancelled module gets to clean up (detach, unmount) before it is killed.
    cancel_grace: Seconds = 15.0
    health: HealthConfig = Field(default_factory=HealthConfig)
    log_format: Literal["json", "logfmt"] = "json"
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("device", "running_root")
    @classmethod
    def _empty_is_none(cls, value: str | None) -> str | None:
        return value or None


def config_path(explicit: str | os.PathLike[str] | None = None) -> Path | None:
    """The file to read: ``explicit``, ``$KUBEOS_AGENT_CONFIG``, or the default when it exists."""
    if explicit:
        return Path(explicit)
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env)
    return DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.exists() else None


def load(path: str | os.PathLike[str] | None = None) -> AgentConfig:
    """Read and validate the configuration; defaults only when no file is given or found."""
    source = config_path(path)
    if source is None:
        return AgentConfig()
    try:
        data = yaml.safe_load(source.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read the agent configuration {source}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"the agent configuration {source} is not valid YAML: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"the agent configuration {source} must be a mapping of settings")
    try:
        return AgentConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"the agent configuration {source} is not valid: {problems}") from exc
