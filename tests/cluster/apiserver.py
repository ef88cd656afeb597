"""A real, throw-away Kubernetes control plane for tests: etcd + kube-apiserver on 127.0.0.1.

``running_cluster(workdir)`` starts Debian's ``etcd`` (plain HTTP on a free loopback port, data on tmpfs)
and a ``kube-apiserver`` built from the Kubernetes Go modules by ``scripts/build-kube-apiserver.sh``
(TLS on a free loopback port, client certificates, ServiceAccount tokens, ``Node,RBAC`` authorization),
waits for ``/readyz``, writes an admin kubeconfig and yields a :class:`Cluster`. Both processes are
stopped (SIGTERM, then SIGKILL) when the ``with`` block ends, however it ends; they also get SIGKILL
from the kernel if the Python process dies first (``PR_SET_PDEATHSIG``).

There is no kubelet, scheduler or controller-manager. :class:`Cluster` plays their part where tests
need it, always through the API like the real component would:

- kubelet: ``create_node``, ``set_node_os_image``, ``set_node_ready``, ``bind_pod`` (a Pod with
  ``spec.nodeName``, reported Running and Ready), ``finish_pod_deletions`` (a pod that has a
  ``deletionTimestamp`` is deleted with grace 0, as the kubelet does once its containers stopped);
- disruption controller: ``sync_pdbs`` computes PodDisruptionBudget status (healthy/desired/expected
  pods, ``disruptionsAllowed``, expiry of ``disruptedPods``) so the Eviction API decides as in a real
  cluster;
- ServiceAccount controller: ``ensure_namespace`` creates the namespace's ``default`` ServiceAccount;
- ``kubelet_loop()`` runs ``finish_pod_deletions`` and ``sync_pdbs`` in a background thread.

Clients: ``cluster.api`` is an admin ``kubernetes.client.ApiClient`` (O=system:masters);
``client_for_user(name, groups)`` and ``client_for_service_account(namespace, name)`` mint clients
with exactly the rights RBAC gives them (and the matching kubeconfig files, for subprocesses).

Usable outside pytest too (benchmarks): ``with running_cluster(Path(tmp)) as cluster: ...``.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "scripts" / "build-kube-apiserver.sh"

STRATEGIC = "application/strategic-merge-patch+json"
MERGE = "application/merge-patch+json"
APPLY = "application/apply-patch+yaml"

DEFAULT_OS_IMAGE = "KubeOS 1.0.0"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
SERVICE_CLUSTER_IP_RANGE = "10.96.0.0/16"
# Admission plugins on top of the defaults, and default ones turned off because only a controller that does
# not run here would finish their work (the not-ready taint stays forever without the node lifecycle
# controller; PVC/PV protection finalizers without the protection controllers; default classes are moot).
ENABLE_ADMISSION = ("NodeRestriction",)
DISABLE_ADMISSION = (
    "TaintNodesByCondition",
    "StorageObjectInUseProtection",
    "DefaultStorageClass",
    "DefaultIngressClass",
)
# How long an entry in a PDB's status.disruptedPods counts before the disruption controller drops it
# (DeletionTimeout in pkg/controller/disruption).
DISRUPTED_POD_TIMEOUT = timedelta(minutes=2)


class ClusterUnavailable(RuntimeError):
    """kube-apiserver cannot be built on this machine (the test cluster is to be skipped)."""


class ProcessFailed(RuntimeError):
    """etcd or kube-apiserver exited or did not become ready; the message ends with its log."""


# --- building and finding the binaries ---------------------------------------------------------------------


def build_kube_apiserver(timeout: float = 3600) -> Path:
    """Run ``scripts/build-kube-apiserver.sh`` (a no-op when cached) and return the binary's path."""
    if shutil.which("bash") is None:
        raise ClusterUnavailable("bash not found")
    try:
        proc = subprocess.run(["bash", str(BUILD_SCRIPT)], capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise ClusterUnavailable(f"{BUILD_SCRIPT} did not finish in {timeout:.0f} s") from exc
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise ClusterUnavailable(
            f"kube-apiserver cannot be built here ({BUILD_SCRIPT} exited {proc.returncode}):\n{tail}"
        )
    return Path(lines[-1])


def find_etcd() -> Path:
    """The etcd binary: ``$KUBEOS_ETCD`` or ``etcd`` on PATH (Debian package ``etcd-server``)."""
    configured = os.environ.get("KUBEOS_ETCD")
    found = configured or shutil.which("etcd")
    if not found or not os.access(found, os.X_OK):
        raise FileNotFoundError(
            f"etcd not found ({configured or 'not on PATH'}): install Debian's etcd-server "
            "(scripts/setup.sh) or point KUBEOS_ETCD at an etcd binary"
        )
    return Path(found)


def binary_version(binary: Path) -> str:
    """First line of ``<binary> --version`` (``Kubernetes v1.37.2``, ``etcd Version: 3.4.23``)."""
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30, check=True)
    return out.stdout.strip().splitlines()[0]


# --- certificates (openssl CLI) ----------------------------------------------------------------------------

_CA_CONF = """\
[req]
distinguished_name = dn
prompt = no
x509_extensions = v3_ca
[dn]
CN = kubeos-test-ca
[v3_ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign, digitalSignature
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
"""

_LEAF_EXT = """\
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = {eku}
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
{san}
"""

_SERVER_SANS = (
    "IP:127.0.0.1",
    "DNS:localhost",
    "DNS:kubernetes",
    "DNS:kubernetes.default",
    "DNS:kubernetes.default.svc",
    "DNS:kubernetes.default.svc.cluster.local",
    "IP:10.96.0.1",
)
_NAME_OK = re.compile(r"^[A-Za-z0-9:._@-]+$")


def _openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")


def _ec_key(path: Path, cwd: Path) -> None:
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(path), cwd=cwd)
    path.chmod(0o600)


@dataclass(frozen=True)
class Pki:
    """The cluster's certificates and keys (all files under ``directory``)."""

    directory: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    admin_cert: Path
    admin_key: Path
    sa_key: Path  # ServiceAccount token signing key (private)
    sa_pub: Path  # ... and its public key, for verification

    @classmethod
    def create(cls, directory: Path) -> Pki:
        directory.mkdir(parents=True, exist_ok=True)
        conf = directory / "ca.cnf"
        conf.write_text(_CA_CONF)
        ca_cert, ca_key = directory / "ca.crt", directory / "ca.key"
        _ec_key(ca_key, directory)
        _openssl(
            "req", "-x509", "-new", "-key", str(ca_key), "-out", str(ca_cert), "-days", "7", "-config", str(conf),
            cwd=directory,
        )  # fmt: skip
        sa_key, sa_pub = directory / "sa.key", directory / "sa.pub"
        _ec_key(sa_key, directory)
        _openssl("pkey", "-in", str(sa_key), "-pubout", "-out", str(sa_pub), cwd=directory)
        pki = cls(
            directory=directory,
            ca_cert=ca_cert,
            ca_key=ca_key,
            server_cert=directory / "apiserver.crt",
            server_key=directory / "apiserver.key",
            admin_cert=directory / "admin.crt",
            admin_key=directory / "admin.key",
            sa_key=sa_key,
            sa_pub=sa_pub,
        )
        pki._sign("apiserver", "kube-apiserver", (), "serverAuth", _SERVER_SANS)
        pki._sign("admin", "kubeos-admin", ("system:masters",), "clientAuth", ())
        return pki

    def client_cert(self, user: str, groups: Sequence[str] = ()) -> tuple[Path, Path]:
        """A client certificate for ``user`` (CN) in ``groups`` (one O each): (cert, key)."""
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", user)
        stem = f"user-{safe}-{uuid.uuid4().hex[:8]}"
        self._sign(stem, user, groups, "clientAuth", ())
        return self.directory / f"{stem}.crt", self.directory / f"{stem}.key"

    def _sign(self, stem: str, cn: str, orgs: Sequence[str], eku: str, sans: Sequence[str]) -> None:
        for name in (cn, *orgs):
            if not _NAME_OK.match(name):
                raise ValueError(f"unsupported character in certificate name {name!r}")
        key, csr, cert = (self.directory / f"{stem}.{ext}" for ext in ("key", "csr", "crt"))
        ext = self.directory / f"{stem}.ext"
        ext.write_text(_LEAF_EXT.format(eku=eku, san=f"subjectAltName = {', '.join(sans)}" if sans else ""))
        _ec_key(key, self.directory)
        subject = "".join(f"/O={org}" for org in orgs) + f"/CN={cn}"
        _openssl("req", "-new", "-key", str(key), "-out", str(csr), "-subj", subject, cwd=self.directory)
        _openssl(
            "x509", "-req", "-in", str(csr), "-CA", str(self.ca_cert), "-CAkey", str(self.ca_key),
            "-CAcreateserial", "-out", str(cert), "-days", "7", "-extfile", str(ext), cwd=self.directory,
        )  # fmt: skip
        csr.unlink()


# --- processes ---------------------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class ManagedProcess:
    """A server process with its output in a log file; ``stop()`` is SIGTERM, then SIGKILL."""

    def __init__(self, name: str, argv: Sequence[str], log: Path) -> None:
        self.name = name
        self.argv = list(argv)
        self.log = log
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if self.running:
            raise RuntimeError(f"{self.name} is already running")
        with open(self.log, "ab") as out:
            out.write(f"\n=== {datetime.now(UTC).isoformat()} starting: {' '.join(self.argv)}\n".encode())
            out.flush()
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,  # only one prctl call between fork and exec
            )

    @property
    def pid(self) -> int:
        if self.popen is None:
            raise RuntimeError(f"{self.name} was never started")
        return self.popen.pid

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self, timeout: float = 20) -> None:
        proc = self.popen
        if proc is None or proc.poll() is not None:
            return
        try:
            proc.terminate()
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        finally:
            if proc.poll() is None:  # wait() interrupted: never leave it behind
                proc.kill()
                proc.wait()

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def failed(self, what: str) -> ProcessFailed:
        code = self.popen.poll() if self.popen else None
        state = f"exited with {code}" if code is not None else "still running"
        return ProcessFailed(f"{self.name} {what} ({state}; log {self.log}):\n{self.log_tail()}")


def listening_addresses(pid: int) -> set[tuple[str, int]]:
    """The (address, port) pairs on which process ``pid`` has listening TCP sockets (from /proc)."""
    inodes: set[str] = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found: set[tuple[str, int]] = set()
    for table, width in (("tcp", 4), ("tcp6", 16)):
        with contextlib.suppress(FileNotFoundError), open(f"/proc/{pid}/net/{table}") as handle:
            next(handle)
            for line in handle:
                cols = line.split()
                local, state, inode = cols[1], cols[3], cols[9]
                if state != "0A" or inode not in inodes:  # 0A = LISTEN
                    continue
                hex_addr, hex_port = local.split(":")
                raw = bytes.fromhex(hex_addr)
                # /proc prints the address as host-order 32-bit words
                words = b"".join(raw[i : i + 4][::-1] for i in range(0, width, 4))
                family = socket.AF_INET if width == 4 else socket.AF_INET6
                found.add((socket.inet_ntop(family, words), int(hex_port, 16)))
    return found


# --- the cluster -------------------------------------------------------------------------------------------


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _to_dict(api: k8s.ApiClient, obj: Any) -> dict[str, Any]:
    """A plain dict (camelCase keys) from a client model or a mapping."""
    if isinstance(obj, Mapping):
        return copy.deepcopy(dict(obj))
    data = api.sanitize_for_serialization(obj)  # type: ignore[no-untyped-call]
    if not isinstance(data, dict):
        raise TypeError(f"cannot turn {type(obj).__name__} into a dict")
    return data


def _meta(obj: Any) -> k8s.V1ObjectMeta:
    """``obj.metadata``, which every object the API server returns has."""
    meta = obj.metadata
    if not isinstance(meta, k8s.V1ObjectMeta):
        raise TypeError(f"{type(obj).__name__} without metadata")
    return meta


def _is_ready(conditions: Iterable[Any] | None) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in conditions or ())


def label_selector_string(selector: Any) -> str | None:
    """A ``V1LabelSelector`` as a label-selector query string; ``None`` for a selector that matches nothing."""
    if selector is None:
        return None
    parts = [f"{k}={v}" for k, v in sorted((selector.match_labels or {}).items())]
    for expr in selector.match_expressions or ():
        values = ",".join(expr.values or ())
        parts.append(
            {
                "In": f"{expr.key} in ({values})",
                "NotIn": f"{expr.key} notin ({values})",
                "Exists": expr.key,
                "DoesNotExist": f"!{expr.key}",
            }[expr.operator]
        )
    return ",".join(parts)


def _scaled(value: int | str, total: int, round_up: bool) -> int:
    """intstr.GetScaledValueFromIntOrPercent."""
    if isinstance(value, int):
        return value
    if value.endswith("%"):
        percent = int(value[:-1])
        return -(-percent * total // 100) if round_up else percent * total // 100
    return int(value)


@dataclass
class Cluster:
    """A running etcd + kube-apiserver, with admin access and the helpers that stand in for kubelets."""

    workdir: Path
    pki: Pki
    server: str  # https://127.0.0.1:<port>
    etcd_url: str  # http://127.0.0.1:<port>
    kubeconfig: Path  # admin kubeconfig (O=system:masters)
    api: k8s.ApiClient  # admin client
    kube_version: str  # "Kubernetes v1.37.2"
    etcd_version: str  # "etcd Version: 3.4.23"
    startup_seconds: float
    etcd: ManagedProcess
    apiserver: ManagedProcess
    _clients: list[k8s.ApiClient] = field(default_factory=list, repr=False)
    _nodes: list[str] = field(default_factory=list, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _dynamic: Any = field(default=None, repr=False)

    # -- typed API groups of the admin client --

    @property
    def core(self) -> k8s.CoreV1Api:
        return k8s.CoreV1Api(self.api)

    @property
    def policy(self) -> k8s.PolicyV1Api:
        return k8s.PolicyV1Api(self.api)

    @property
    def rbac(self) -> k8s.RbacAuthorizationV1Api:
        return k8s.RbacAuthorizationV1Api(self.api)

    # -- API server control --

    def readyz(self, timeout: float = 2) -> bool:
        """True when ``/readyz`` answers 200 (admin credentials)."""
        ctx = ssl.create_default_context(cafile=str(self.pki.ca_cert))
        ctx.load_cert_chain(str(self.pki.admin_cert), str(self.pki.admin_key))
        try:
            with urllib.request.urlopen(f"{self.server}/readyz", context=ctx, timeout=timeout) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while not self.readyz():
            if not self.apiserver.running:
                raise self.apiserver.failed("exited before /readyz answered")
            if time.monotonic() > deadline:
                raise self.apiserver.failed(f"was not ready within {timeout:.0f} s")
            time.sleep(0.2)

    def restart_apiserver(self, down_seconds: float = 0) -> None:
        """Stop kube-apiserver, wait ``down_seconds``, start it again on the same port, wait for /readyz."""
        self.apiserver.stop()
        time.sleep(down_seconds)
        self.apiserver.start()
        self.wait_ready()

    # -- kubeconfigs and clients --

    def write_kubeconfig(self, path: Path, user: Mapping[str, str]) -> Path:
        """A kubeconfig for this cluster with the given ``user`` entry (client cert paths or a token)."""
        doc = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "kubeos-test",
                    "cluster": {"server": self.server, "certificate-authority": str(self.pki.ca_cert)},
                }
            ],
            "users": [{"name": "user", "user": dict(user)}],
            "contexts": [{"name": "test", "context": {"cluster": "kubeos-test", "user": "user"}}],
            "current-context": "test",
        }
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        path.chmod(0o600)
        return path

    def client_from_kubeconfig(self, path: Path) -> k8s.ApiClient:
        api: k8s.ApiClient = k8s_config.new_client_from_config(  # type: ignore[no-untyped-call]
            config_file=str(path), persist_config=False
        )
        with self._lock:
            self._clients.append(api)
        return api

    def kubeconfig_for_user(self, user: str, groups: Sequence[str] = ()) -> Path:
        """Mint a client certificate (CN=user, O=each group) and write a kubeconfig that uses it."""
        cert, key = self.pki.client_cert(user, groups)
        return self.write_kubeconfig(
            cert.with_suffix(".kubeconfig"), {"client-certificate": str(cert), "client-key": str(key)}
        )

    def client_for_user(self, user: str, groups: Sequence[str] = ()) -> k8s.ApiClient:
        """An ApiClient authenticated as ``user`` in ``groups`` by a client certificate."""
        return self.client_from_kubeconfig(self.kubeconfig_for_user(user, groups))

    def service_account_token(self, namespace: str, name: str, *, expiration_seconds: int = 86400) -> str:
        """A bound token for ServiceAccount ``namespace/name`` (TokenRequest API); the SA is created if missing."""
        self.ensure_namespace(namespace)
        with contextlib.suppress(_Conflict):
            _created(
                lambda: self.core.create_namespaced_service_account(
                    namespace, k8s.V1ServiceAccount(metadata=k8s.V1ObjectMeta(name=name))
                )
            )
        request = k8s.AuthenticationV1TokenRequest(
            spec=k8s.V1TokenRequestSpec(audiences=[], expiration_seconds=expiration_seconds)
        )
        answer = self.core.create_namespaced_service_account_token(name, namespace, request)
        if answer.status is None or not answer.status.token:
            raise RuntimeError(f"TokenRequest for {namespace}/{name} returned no token")
        return answer.status.token

    def kubeconfig_for_service_account(self, namespace: str, name: str) -> Path:
        token = self.service_account_token(namespace, name)
        path = self.pki.directory / f"sa-{namespace}-{name}-{uuid.uuid4().hex[:8]}.kubeconfig"
        return self.write_kubeconfig(path, {"token": token})

    def client_for_service_account(self, namespace: str, name: str) -> k8s.ApiClient:
        """An ApiClient authenticated as ServiceAccount ``namespace/name`` by a bound token."""
        return self.client_from_kubeconfig(self.kubeconfig_for_service_account(namespace, name))

    # -- namespaces (and the ServiceAccount controller's part) --

    def ensure_namespace(self, name: str) -> None:
        """Create namespace ``name`` and its ``default`` ServiceAccount unless they exist."""
        with contextlib.suppress(_Conflict):
            _created(lambda: self.core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=name))))
        with contextlib.suppress(_Conflict):
            _created(
                lambda: self.core.create_namespaced_service_account(
                    name, k8s.V1ServiceAccount(metadata=k8s.V1ObjectMeta(name="default"))
                )
            )

    def create_namespace(self, prefix: str = "test") -> str:
        """A new namespace with a unique name (``<prefix>-<6 hex>``); returns the name."""
        name = f"{prefix}-{uuid.uuid4().hex[:6]}"
        self.ensure_namespace(name)
        return name

    # -- the kubelet's part: nodes --

    def create_node(
        self,
        name: str,
        labels: Mapping[str, str] | None = None,
        os_image: str = DEFAULT_OS_IMAGE,
        *,
        ready: bool = True,
        annotations: Mapping[str, str] | None = None,
    ) -> Any:
        """Register Node ``name`` as a kubelet would (well-known labels, full nodeInfo, Ready condition)."""
        node_labels = {
            "kubernetes.io/hostname": name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            **(labels or {}),
        }
        body = k8s.V1Node(metadata=k8s.V1ObjectMeta(name=name, labels=node_labels, annotations=dict(annotations or {})))
        self.core.create_node(body)
        with self._lock:
            self._nodes.append(name)
        now = _now()
        status = {
            "status": {
                "nodeInfo": {
                    "machineID": uuid.uuid4().hex,
                    "systemUUID": str(uuid.uuid4()),
                    "bootID": str(uuid.uuid4()),
                    "kernelVersion": "6.1.0-kubeos",
                    "osImage": os_image,
                    "containerRuntimeVersion": "containerd://1.7.24",
                    "kubeletVersion": self.kube_version.split()[-1],
                    "kubeProxyVersion": "",
                    "operatingSystem": "linux",
                    "architecture": "amd64",
                },
                "addresses": [
                    {"type": "InternalIP", "address": "127.0.0.1"},
                    {"type": "Hostname", "address": name},
                ],
                "capacity": {"cpu": "2", "memory": "4Gi", "pods": "110"},
                "allocatable": {"cpu": "2", "memory": "4Gi", "pods": "110"},
                "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
                "conditions": [_ready_condition(ready, now, now)],
            }
        }
        return self.core.patch_node_status(name, status, _content_type=STRATEGIC)

    def set_node_os_image(self, name: str, os_image: str, *, ready: bool = True, new_boot: bool = True) -> Any:
        """Report ``os_image`` in status.nodeInfo.osImage (a new bootID when ``new_boot``) and the Ready condition."""
        node_info: dict[str, str] = {"osImage": os_image}
        if new_boot:
            node_info["bootID"] = str(uuid.uuid4())
        return self._patch_node_status(name, {"nodeInfo": node_info}, ready)

    def set_node_ready(self, name: str, ready: bool) -> Any:
        """Report the node Ready (or NotReady), as the kubelet's heartbeat does."""
        return self._patch_node_status(name, {}, ready)

    def _patch_node_status(self, name: str, status: dict[str, Any], ready: bool) -> Any:
        node = self.core.read_node_status(name)
        now = _now()
        transition = now
        for cond in (node.status.conditions if node.status else None) or ():
            if cond.type == "Ready" and (cond.status == "True") == ready and cond.last_transition_time:
                transition = cond.last_transition_time.strftime("%Y-%m-%dT%H:%M:%SZ")
        status = {**status, "conditions": [_ready_condition(ready, now, transition)]}
        return self.core.patch_node_status(name, {"status": status}, _content_type=STRATEGIC)

    def delete_node(self, name: str) -> None:
        """Delete Node ``name`` and (as the pod GC would) every pod bound to it, at once."""
        for pod in self.core.list_pod_for_all_namespaces(field_selector=f"spec.nodeName={name}").items:
            self._delete_pod_now(pod)
        with contextlib.suppress(_NotFound):
            _deleted(lambda: self.core.delete_node(name))

    # -- the kubelet's part: pods --

    def bind_pod(self, pod: Mapping[str, Any] | Any, node: str, *, ready: bool = True) -> Any:
        """Create ``pod`` (a manifest dict or V1Pod) bound to ``node`` and report it Running (and Ready).

        A pod without containers gets one ``pause`` container; the namespace (default ``default``) and its
        ``default`` ServiceAccount are created when missing.
        """
        manifest = _to_dict(self.api, pod)
        manifest.setdefault("apiVersion", "v1")
        manifest.setdefault("kind", "Pod")
        meta = manifest.setdefault("metadata", {})
        namespace = meta.setdefault("namespace", "default")
        spec = manifest.setdefault("spec", {})
        spec["nodeName"] = node
        spec.setdefault("containers", [{"name": "pause", "image": "registry.k8s.io/pause:3.10"}])
        self.ensure_namespace(namespace)
        body = k8s.V1Pod.from_dict(manifest)
        if body is None:
            raise ValueError(f"not a Pod: {manifest!r}")
        created = self.core.create_namespaced_pod(namespace, body)
        now = _now()
        cond = "True" if ready else "False"
        status = {
            "phase": "Running",
            "hostIP": "127.0.0.1",
            "podIP": "10.244.0.1",
            "startTime": now,
            "conditions": [
                {
                    "type": kind,
                    "status": "True" if kind in ("PodScheduled", "Initialized") else cond,
                    "lastTransitionTime": now,
                }
                for kind in ("PodScheduled", "Initialized", "ContainersReady", "Ready")
            ],
            "containerStatuses": [
                {
                    "name": c["name"],
                    "image": c.get("image", ""),
                    "imageID": "",
                    "containerID": f"containerd://{uuid.uuid4().hex}",
                    "ready": ready,
                    "started": True,
                    "restartCount": 0,
                    "state": {"running": {"startedAt": now}},
                }
                for c in spec["containers"]
            ],
        }
        return self.core.patch_namespaced_pod_status(
            str(_meta(created).name), namespace, {"status": status}, _content_type=STRATEGIC
        )

    def finish_pod_deletions(self) -> list[str]:
        """Delete (grace 0) every pod that has a deletionTimestamp, as its kubelet would; returns ns/name list."""
        finished = []
        for pod in self.core.list_pod_for_all_namespaces().items:
            meta = _meta(pod)
            if meta.deletion_timestamp is not None and self._delete_pod_now(pod):
                finished.append(f"{meta.namespace}/{meta.name}")
        return finished

    def _delete_pod_now(self, pod: Any) -> bool:
        meta = _meta(pod)
        options = k8s.V1DeleteOptions(grace_period_seconds=0, preconditions=k8s.V1Preconditions(uid=meta.uid))
        try:
            self.core.delete_namespaced_pod(str(meta.name), str(meta.namespace), body=options)
        except ApiException as exc:
            if exc.status in (404, 409):  # gone already, or a new pod of the same name
                return False
            raise
        return True

    # -- the disruption controller's part --

    def sync_pdbs(self) -> int:
        """Recompute every PodDisruptionBudget's status like the disruption controller; returns how many changed.

        Pods count as healthy when Ready, not being deleted and not in ``disruptedPods``. ``minAvailable``
        as a number is desired healthy with expected = matching pods; a percentage, or ``maxUnavailable``,
        is taken relative to the number of matching pods (what the controller computes when the pods'
        controller has that many replicas; there is no workload controller here).
        """
        changed = 0
        now = datetime.now(UTC)
        for pdb in self.policy.list_pod_disruption_budget_for_all_namespaces().items:
            meta = _meta(pdb)
            namespace, name, generation = str(meta.namespace), str(meta.name), meta.generation
            spec = pdb.spec or k8s.V1PodDisruptionBudgetSpec()
            old = pdb.status
            query = label_selector_string(spec.selector)
            pods = [] if query is None else self.core.list_namespaced_pod(namespace, label_selector=query).items
            live = [p for p in pods if _meta(p).deletion_timestamp is None]
            live_names = {_meta(p).name for p in live}
            old_disrupted = (old.disrupted_pods if old else None) or {}
            disrupted = {
                pod: when
                for pod, when in old_disrupted.items()
                if pod in live_names and when + DISRUPTED_POD_TIMEOUT > now
            }
            healthy = len(
                [
                    p
                    for p in live
                    if _meta(p).name not in disrupted and _is_ready(p.status.conditions if p.status else None)
                ]
            )
            expected = len(pods)
            if spec.max_unavailable is not None:
                desired = max(0, expected - _scaled(spec.max_unavailable, expected, True))
            elif spec.min_available is not None:
                desired = _scaled(spec.min_available, expected, True)
            else:
                desired = expected
            allowed = max(0, healthy - desired)
            if (
                old is not None
                and old.observed_generation == generation
                and (old.current_healthy, old.desired_healthy, old.expected_pods, old.disruptions_allowed)
                == (healthy, desired, expected, allowed)
                and old_disrupted == disrupted
            ):
                continue
            ok = allowed > 0
            disrupted_patch: dict[str, str | None] = {pod: None for pod in old_disrupted if pod not in disrupted}
            disrupted_patch.update({pod: when.strftime("%Y-%m-%dT%H:%M:%SZ") for pod, when in disrupted.items()})
            new_status: dict[str, Any] = {
                "observedGeneration": generation,
                "currentHealthy": healthy,
                "desiredHealthy": desired,
                "expectedPods": expected,
                "disruptionsAllowed": allowed,
                "disruptedPods": disrupted_patch,
                "conditions": [
                    {
                        "type": "DisruptionAllowed",
                        "status": "True" if ok else "False",
                        "reason": "SufficientPods" if ok else "InsufficientPods",
                        "message": "",
                        "observedGeneration": generation,
                        "lastTransitionTime": _now(),
                    }
                ],
            }
            patch = {"metadata": {"resourceVersion": meta.resource_version}, "status": new_status}
            try:
                self.policy.patch_namespaced_pod_disruption_budget_status(name, namespace, patch, _content_type=MERGE)
            except ApiException as exc:
                if exc.status in (404, 409):  # deleted or changed meanwhile: the next round sees it
                    continue
                raise
            changed += 1
        return changed

    @contextlib.contextmanager
    def kubelet_loop(self, interval: float = 0.2) -> Iterator[None]:
        """Run ``finish_pod_deletions`` and ``sync_pdbs`` every ``interval`` s in a thread while the block runs.

        The first error the loop meets is raised when the block ends.
        """
        stop = threading.Event()
        errors: list[BaseException] = []

        def loop() -> None:
            while not stop.is_set():
                try:
                    self.sync_pdbs()
                    self.finish_pod_deletions()
                except Exception as exc:  # surfaced when the block ends
                    errors.append(exc)
                    return
                stop.wait(interval)

        thread = threading.Thread(target=loop, name="kubelet-loop", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=30)
        if errors:
            raise errors[0]

    # -- server-side apply --

    def apply(
        self,
        manifests: Mapping[str, Any] | Iterable[Mapping[str, Any]],
        *,
        field_manager: str = "kubeos-tests",
        force: bool = True,
    ) -> list[dict[str, Any]]:
        """Server-side apply one manifest or several (e.g. from ``yaml.safe_load_all``); returns the results.

        Namespaced objects without a namespace go to ``default``. Kinds that a CRD applied just before
        defines are retried while discovery catches up (up to 30 s).
        """
        from kubernetes.dynamic import DynamicClient
        from kubernetes.dynamic.exceptions import ResourceNotFoundError

        docs = [manifests] if isinstance(manifests, Mapping) else [m for m in manifests if m]
        if self._dynamic is None:
            cache = self.workdir / "discovery-cache.json"
            self._dynamic = DynamicClient(self.api, cache_file=str(cache))  # type: ignore[no-untyped-call]
        results = []
        for doc in docs:
            body = copy.deepcopy(dict(doc))
            deadline = time.monotonic() + 30
            while True:
                try:
                    resource = self._dynamic.resources.get(api_version=body["apiVersion"], kind=body["kind"])
                    break
                except ResourceNotFoundError:
                    if time.monotonic() > deadline:
                        raise
                    self._dynamic.resources.invalidate_cache()
                    time.sleep(0.5)
            namespace = None
            if resource.namespaced:
                namespace = body.setdefault("metadata", {}).setdefault("namespace", "default")
            answer = self._dynamic.server_side_apply(
                resource, body=body, namespace=namespace, field_manager=field_manager, force_conflicts=force
            )
            results.append(answer.to_dict())
        return results

    # -- bookkeeping for per-test cleanup --

    def checkpoint(self) -> int:
        with self._lock:
            return len(self._nodes)

    def delete_nodes_since(self, mark: int) -> None:
        """Delete the Nodes (and their pods) that ``create_node`` made after ``checkpoint()`` returned ``mark``."""
        with self._lock:
            names, self._nodes[mark:] = self._nodes[mark:], []
        for name in dict.fromkeys(names):
            self.delete_node(name)

    def close_clients(self) -> None:
        with self._lock:
            clients, self._clients[:] = list(self._clients), []
        for api in clients:
            with contextlib.suppress(Exception):
                api.close()  # type: ignore[no-untyped-call]


def _ready_condition(ready: bool, heartbeat: str, transition: str) -> dict[str, str]:
    return {
        "type": "Ready",
        "status": "True" if ready else "False",
        "reason": "KubeletReady" if ready else "KubeletNotReady",
        "message": "kubelet is posting ready status" if ready else "simulated: node not ready",
        "lastHeartbeatTime": heartbeat,
        "lastTransitionTime": transition,
    }


class _Conflict(Exception):
    pass


class _NotFound(Exception):
    pass


def _created(call: Callable[[], Any]) -> Any:
    """Run a create call; an AlreadyExists answer becomes ``_Conflict``."""
    try:
        return call()
    except ApiException as exc:
        if exc.status == 409:
            raise _Conflict from exc
        raise


def _deleted(call: Callable[[], Any]) -> Any:
    try:
        return call()
    except ApiException as exc:
        if exc.status == 404:
            raise _NotFound from exc
        raise


# --- start and stop ----------------------------------------------------------------------------------------


def _wait_etcd(proc: ManagedProcess, url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if json.loads(resp.read()).get("health") == "true":
                    return
        except (urllib.error.URLError, OSError, ValueError):
            pass
        if not proc.running:
            raise proc.failed("exited before /health answered")
        if time.monotonic() > deadline:
            raise proc.failed(f"was not healthy within {timeout:.0f} s")
        time.sleep(0.1)


def _etcd_data_dir() -> Path:
    """etcd's data directory: on tmpfs (/dev/shm) when possible, since Debian's etcd 3.4 cannot skip fsync.

    Each holds an ``owner`` file with the creating process's pid; directories whose owner is gone (a run that
    was SIGKILLed before its cleanup) are removed here.
    """
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())
    for stale in base.glob("kubeos-etcd-*"):
        with contextlib.suppress(OSError, ValueError):
            if not Path(f"/proc/{int((stale / 'owner').read_text())}").exists():
                shutil.rmtree(stale, ignore_errors=True)
    data_dir = Path(tempfile.mkdtemp(prefix="kubeos-etcd-", dir=base))
    (data_dir / "owner").write_text(str(os.getpid()))
    return data_dir / "data"


@contextlib.contextmanager
def running_cluster(
    workdir: Path,
    *,
    apiserver_binary: Path | None = None,
    etcd_binary: Path | None = None,
    extra_apiserver_args: Sequence[str] = (),
) -> Iterator[Cluster]:
    """Start etcd and kube-apiserver on 127.0.0.1, yield the :class:`Cluster`, stop both whatever happens.

    ``apiserver_binary`` defaults to the one ``build_kube_apiserver()`` returns (building it if needed).
    ``workdir`` keeps the certificates, kubeconfigs and the two logs (``etcd.log``, ``kube-apiserver.log``).
    """
    started = time.monotonic()
    workdir.mkdir(parents=True, exist_ok=True)
    apiserver_bin = apiserver_binary or build_kube_apiserver()
    etcd_bin = etcd_binary or find_etcd()
    kube_version, etcd_version = binary_version(apiserver_bin), binary_version(etcd_bin)
    pki = Pki.create(workdir / "pki")
    data_dir = _etcd_data_dir()
    etcd_port, peer_port, api_port = free_port(), free_port(), free_port()
    etcd_url = f"http://127.0.0.1:{etcd_port}"
    peer_url = f"http://127.0.0.1:{peer_port}"
    etcd = ManagedProcess(
        "etcd",
        [
            str(etcd_bin),
            "--name=kubeos-test",
            f"--data-dir={data_dir}",
            f"--listen-client-urls={etcd_url}",
            f"--advertise-client-urls={etcd_url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=kubeos-test={peer_url}",
            "--initial-cluster-state=new",
            "--logger=zap",
            "--log-level=warn",
        ],
        workdir / "etcd.log",
    )
    apiserver = ManagedProcess(
        "kube-apiserver",
        [
            str(apiserver_bin),
            f"--etcd-servers={etcd_url}",
            "--bind-address=127.0.0.1",
            # The "kubernetes" Service gets no endpoints: its reconciler refuses loopback addresses.
            "--advertise-address=127.0.0.1",
            "--endpoint-reconciler-type=none",
            f"--secure-port={api_port}",
            f"--cert-dir={workdir / 'apiserver-certs'}",
            f"--tls-cert-file={pki.server_cert}",
            f"--tls-private-key-file={pki.server_key}",
            f"--client-ca-file={pki.ca_cert}",
            f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
            f"--service-account-key-file={pki.sa_pub}",
            f"--service-account-signing-key-file={pki.sa_key}",
            f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
            "--authorization-mode=Node,RBAC",
            "--anonymous-auth=false",
            f"--enable-admission-plugins={','.join(ENABLE_ADMISSION)}",
            f"--disable-admission-plugins={','.join(DISABLE_ADMISSION)}",
            "--allow-privileged=true",
            "--profiling=false",
            "--v=1",
            *extra_apiserver_args,
        ],
        workdir / "kube-apiserver.log",
    )
    api: k8s.ApiClient | None = None
    cluster: Cluster | None = None
    try:
        etcd.start()
        _wait_etcd(etcd, etcd_url)
        apiserver.start()
        kubeconfig = workdir / "admin.kubeconfig"
        server = f"https://127.0.0.1:{api_port}"
        cluster = Cluster(
            workdir=workdir,
            pki=pki,
            server=server,
            etcd_url=etcd_url,
            kubeconfig=kubeconfig,
            api=k8s.ApiClient(),  # replaced below, once the kubeconfig exists
            kube_version=kube_version,
            etcd_version=etcd_version,
            startup_seconds=0.0,
            etcd=etcd,
            apiserver=apiserver,
        )
        cluster.write_kubeconfig(
            kubeconfig, {"client-certificate": str(pki.admin_cert), "client-key": str(pki.admin_key)}
        )
        api = k8s_config.new_client_from_config(  # type: ignore[no-untyped-call]
            config_file=str(kubeconfig), persist_config=False
        )
        cluster.api = api
        cluster.wait_ready()
        _wait_for_default_namespace(cluster)
        cluster.ensure_namespace("default")
        cluster.startup_seconds = time.monotonic() - started
        yield cluster
    finally:
        try:
            if cluster is not None:
                cluster.close_clients()
            if api is not None:
                api.close()  # type: ignore[no-untyped-call]
        finally:
            try:
                apiserver.stop()
            finally:
                try:
                    etcd.stop()
                finally:
                    shutil.rmtree(data_dir.parent, ignore_errors=True)


def _wait_for_default_namespace(cluster: Cluster, timeout: float = 30) -> None:
    """The API server creates ``default`` and ``kube-system`` itself just after it is ready."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            cluster.core.read_namespace("default")
            return
        except ApiException as exc:
            if exc.status != 404 or time.monotonic() > deadline:
                raise
        time.sleep(0.1)
