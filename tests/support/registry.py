"""A real OCI registry on 127.0.0.1 for tests (Debian's ``docker-registry``, distribution 2.8), and a small push
client and image builder of our own (no docker CLI, no daemon).

``run_registry(workdir, pki, ...)`` starts ``/usr/bin/docker-registry serve config.yml`` with TLS from the test PKI
(``support.tls``), storage under ``workdir``, optionally:

- ``client_cas=True``: the registry requires a client certificate signed by the test CA (``http.tls.clientcas``);
- ``auth="token"``: a token service of ours (HTTPS, a thread of the test process) issues the RS256-signed JWTs the
  registry verifies (``auth.token``); ``users`` are accepted with basic credentials, ``anonymous_pull`` lets anyone
  have pull tokens; ``auth="basic"``: the registry's own htpasswd (bcrypt) authentication;
- ``redirect=True``: blob GETs are answered with a redirect (the registry's ``redirect`` storage middleware) to a
  "CDN" of ours that serves the storage directory over HTTPS and records the headers it received.

The :class:`Registry` it yields pushes blobs (monolithic upload: POST, then PUT with the digest) and manifests (PUT)
as the pusher user, and can tamper with a stored blob.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import http.client
import http.server
import io
import json
import os
import secrets
import shutil
import socket
import ssl
import subprocess
import tarfile
import threading
import time
import urllib.parse
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .tls import Pki

REGISTRY_BIN = "/usr/bin/docker-registry"
SERVICE = "kubeos-test-registry"
ISSUER = "kubeos-test-token-issuer"
PUSHER = ("pusher", "push-secret")

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"


def registry_available() -> bool:
    return os.access(REGISTRY_BIN, os.X_OK)


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- layers and images ---------------------------------------------------------------------------------


def layer_tar(tree: Path, *, mtime: int = 1_700_000_000) -> bytes:
    """A layer of ``tree`` as GNU tar writes it (numeric owners, xattrs, ACLs), all entries dated ``mtime``."""
    proc = subprocess.run(
        [
            "tar", "--create", "--file=-", f"--directory={tree}", "--numeric-owner", "--xattrs",
            "--xattrs-include=*", "--acls", "--sort=name", f"--mtime=@{mtime}", ".",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return proc.stdout


def gzip_bytes(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


@dataclass
class Blob:
    data: bytes
    media_type: str

    @property
    def digest(self) -> str:
        return sha256_digest(self.data)

    def descriptor(self, **extra: Any) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": len(self.data), **extra}


@dataclass
class ImageParts:
    """A single-platform image: its config, its layers (lowest first) and its manifest, all as bytes."""

    config: Blob
    layers: list[Blob]
    manifest: bytes
    media_type: str

    @property
    def digest(self) -> str:
        return sha256_digest(self.manifest)


def make_image(
    layer_tars: list[bytes], *, architecture: str = "amd64", docker: bool = False, compress: bool = True
) -> ImageParts:
    """An image of the given (uncompressed) layer tars: OCI media types, or Docker v2 schema 2 ones."""
    layer_type = DOCKER_LAYER if docker else (OCI_LAYER_GZIP if compress else OCI_LAYER)
    layers = [Blob(gzip_bytes(t) if (compress or docker) else t, layer_type) for t in layer_tars]
    config_doc = {
        "architecture": architecture,
        "os": "linux",
        "config": {"Labels": {"org.opencontainers.image.title": "kubeos test OS"}},
        "rootfs": {"type": "layers", "diff_ids": [sha256_digest(t) for t in layer_tars]},
        "history": [{"created_by": f"kubeos test layer {i}"} for i in range(len(layer_tars))],
    }
    config = Blob(json.dumps(config_doc, sort_keys=True).encode(), DOCKER_CONFIG if docker else OCI_CONFIG)
    media_type = DOCKER_MANIFEST if docker else OCI_MANIFEST
    manifest = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": config.descriptor(),
        "layers": [layer.descriptor() for layer in layers],
    }
    return ImageParts(config, layers, json.dumps(manifest, indent=2).encode(), media_type)


def make_index(images: list[tuple[ImageParts, dict[str, str]]], *, docker: bool = False) -> bytes:
    """An OCI image index (or Docker manifest list) over ``(image, platform)`` pairs."""
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": DOCKER_LIST if docker else OCI_INDEX,
            "manifests": [
                {"mediaType": img.media_type, "digest": img.digest, "size": len(img.manifest), "platform": platform}
                for img, platform in images
            ],
        },
        indent=2,
    ).encode()


# --- the token service ----------------------------------------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class TokenIssuer:
    """Signs registry tokens (JWT, RS256, the signing certificate in ``x5c``) with a self-signed RSA certificate."""

    def __init__(self, directory: Path) -> None:
        self.key_path = directory / "token-signer.key"
        self.cert_path = directory / "token-signer.crt"
        subprocess.run(
            [
                "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(self.key_path),
                "-out", str(self.cert_path), "-days", "2", "-subj", "/CN=kubeos test token issuer",
            ],
            check=True,
            capture_output=True,
        )  # fmt: skip
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        self._key = serialization.load_pem_private_key(self.key_path.read_bytes(), password=None)
        cert = x509.load_pem_x509_certificate(self.cert_path.read_bytes())
        self._x5c = base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode("ascii")

    def issue(self, subject: str, access: list[dict[str, Any]], ttl: int = 300) -> str:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding, rsa

        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self._x5c]}
        claims = {
            "iss": ISSUER,
            "sub": subject,
            "aud": SERVICE,
            "exp": now + ttl,
            "nbf": now - 60,
            "iat": now,
            "jti": secrets.token_hex(8),
            "access": access,
        }
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        key = self._key
        assert isinstance(key, rsa.RSAPrivateKey)
        signature = key.sign(signing_input.encode("ascii"), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{_b64url(signature)}"


class _TokenHandler(http.server.BaseHTTPRequestHandler):
    server: TokenServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _answer(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        parts = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(parts.query)
        user = self._user()
        self.server.requests.append({"path": parts.path, "query": query, "user": user})
        if user is False:
            self._answer(401, {"details": "wrong user name or password"}, {"WWW-Authenticate": 'Basic realm="token"'})
            return
        if user is None and not self.server.anonymous_pull:
            self._answer(401, {"details": "credentials needed"}, {"WWW-Authenticate": 'Basic realm="token"'})
            return
        if query.get("service", [""])[0] != SERVICE:
            self._answer(400, {"details": "unknown service"})
            return
        access = []
        for scope in query.get("scope", []):
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            wanted = [a for a in actions.split(",") if a]
            allowed = wanted if user == PUSHER[0] else [a for a in wanted if a == "pull"]
            if kind == "repository" and name:
                access.append({"type": "repository", "name": name, "actions": allowed})
        token = self.server.issuer.issue(str(user or "anonymous"), access, ttl=self.server.ttl)
        self._answer(200, {"token": token, "access_token": token, "expires_in": self.server.ttl})

    def _user(self) -> str | bool | None:
        """The authenticated user, None without credentials, False for wrong ones."""
        header = self.headers.get("Authorization")
        if not header:
            return None
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            name, _, password = base64.b64decode(value).decode().partition(":")
        except ValueError:
            return False
        return name if self.server.users.get(name) == password else False


class TokenServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, issuer: TokenIssuer, ctx: ssl.SSLContext, users: dict[str, str], anonymous_pull: bool) -> None:
        self.issuer = issuer
        self.ctx = ctx
        self.users = users
        self.anonymous_pull = anonymous_pull
        self.ttl = 300
        self.requests: list[dict[str, Any]] = []
        super().__init__(("127.0.0.1", 0), _TokenHandler)

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = super().get_request()
        return self.ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), addr

    def handle_error(self, request: object, client_address: object) -> None:
        pass


# --- the CDN blob redirects lead to ---------------------------------------------------------------------------


class _CdnHandler(http.server.BaseHTTPRequestHandler):
    server: CdnServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        self.server.requests.append({"path": path, "authorization": self.headers.get("Authorization")})
        root = self.server.root.resolve()
        target = (root / path.lstrip("/")).resolve()
        if root not in target.parents or not target.is_file():
            self.send_error(404)
            return
        data = target.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class CdnServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path, ctx: ssl.SSLContext) -> None:
        self.root = root
        self.ctx = ctx
        self.requests: list[dict[str, Any]] = []
        super().__init__(("127.0.0.1", 0), _CdnHandler)

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = super().get_request()
        return self.ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), addr

    def handle_error(self, request: object, client_address: object) -> None:
        pass


@contextlib.contextmanager
def _serving(server: http.server.ThreadingHTTPServer) -> Iterator[None]:
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


# --- the registry ------------------------------------------------------------------------------------------------


@dataclass
class Registry:
    """A running registry: where it is, and a push client for it."""

    host: str  # 127.0.0.1:PORT
    storage: Path
    pki: Pki
    log: Path
    client_cas: bool = False
    auth: str | None = None
    token_server: TokenServer | None = None
    cdn: CdnServer | None = None
    _token: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"https://{self.host}"

    def _context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.pki.ca_cert))
        if self.client_cas:
            ctx.load_cert_chain(str(self.pki.client_cert), str(self.pki.client_key))
        return ctx

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        """One request to the registry as the pusher (authenticating as the registry asks)."""
        for attempt in range(2):
            all_headers = dict(headers or {})
            auth = self._authorization(path)
            if auth:
                all_headers["Authorization"] = auth
            if body is not None:
                all_headers.setdefault("Content-Length", str(len(body)))
            conn = http.client.HTTPSConnection(self.host, context=self._context(), timeout=30)
            try:
                conn.request(method, path, body=body, headers=all_headers)
                resp = conn.getresponse()
                data = resp.read()
                status, resp_headers = resp.status, {k.lower(): v for k, v in resp.getheaders()}
            finally:
                conn.close()
            if status == 401 and attempt == 0 and self.auth == "token":
                self._token.pop(_repo_of(path), None)
                continue
            return status, resp_headers, data
        return status, resp_headers, data

    def _authorization(self, path: str) -> str | None:
        if self.auth == "basic":
            return "Basic " + base64.b64encode(f"{PUSHER[0]}:{PUSHER[1]}".encode()).decode()
        if self.auth != "token" or self.token_server is None:
            return None
        repo = _repo_of(path)
        if not repo:
            return None
        if repo not in self._token:
            host, port = self.token_server.server_address[:2]
            query = urllib.parse.urlencode({"service": SERVICE, "scope": f"repository:{repo}:pull,push"})
            conn = http.client.HTTPSConnection(f"{host!s}:{port}", context=self._context(), timeout=30)
            try:
                basic = base64.b64encode(f"{PUSHER[0]}:{PUSHER[1]}".encode()).decode()
                conn.request("GET", f"/token?{query}", headers={"Authorization": f"Basic {basic}"})
                resp = conn.getresponse()
                payload = json.loads(resp.read())
            finally:
                conn.close()
            self._token[repo] = payload["token"]
        return f"Bearer {self._token[repo]}"

    def push_blob(self, repo: str, blob: Blob) -> None:
        status, headers, body = self.request("POST", f"/v2/{repo}/blobs/uploads/", b"")
        if status != 202:
            raise AssertionError(f"starting a blob upload failed: {status} {body[:500]!r}")
        location = urllib.parse.urljoin(f"{self.url}/v2/{repo}/blobs/uploads/", headers["location"])
        parts = urllib.parse.urlsplit(location)
        query = [*urllib.parse.parse_qsl(parts.query), ("digest", blob.digest)]
        target = urllib.parse.urlunsplit(("", "", parts.path, urllib.parse.urlencode(query), ""))
        status, _, body = self.request("PUT", target, blob.data, {"Content-Type": "application/octet-stream"})
        if status != 201:
            raise AssertionError(f"uploading blob {blob.digest} failed: {status} {body[:500]!r}")

    def push_manifest(self, repo: str, reference: str, manifest: bytes, media_type: str) -> str:
        status, headers, body = self.request(
            "PUT", f"/v2/{repo}/manifests/{reference}", manifest, {"Content-Type": media_type}
        )
        if status != 201:
            raise AssertionError(f"pushing the manifest {repo}:{reference} failed: {status} {body[:500]!r}")
        digest = sha256_digest(manifest)
        assert headers.get("docker-content-digest") == digest, headers
        return digest

    def push_image(self, repo: str, image: ImageParts, tag: str | None = None) -> str:
        for blob in [image.config, *image.layers]:
            self.push_blob(repo, blob)
        return self.push_manifest(repo, tag or image.digest, image.manifest, image.media_type)

    def push_index(self, repo: str, index: bytes, tag: str | None = None, *, docker: bool = False) -> str:
        return self.push_manifest(repo, tag or sha256_digest(index), index, DOCKER_LIST if docker else OCI_INDEX)

    def blob_file(self, digest: str) -> Path:
        algorithm, _, hexdigest = digest.partition(":")
        return self.storage / "docker/registry/v2/blobs" / algorithm / hexdigest[:2] / hexdigest / "data"

    def tamper(self, digest: str) -> None:
        """Change one byte in the middle of a stored blob (same size): the registry serves it as it is."""
        path = self.blob_file(digest)
        data = bytearray(path.read_bytes())
        middle = len(data) // 2
        data[middle] ^= 0xFF
        path.write_bytes(bytes(data))


def _repo_of(path: str) -> str:
    parts = urllib.parse.urlsplit(path).path.split("/")
    # /v2/<name...>/(blobs|manifests|tags)/...
    for marker in ("blobs", "manifests", "tags"):
        if marker in parts[2:]:
            return "/".join(parts[2 : parts.index(marker, 2)])
    return ""


def _server_context(pki: Pki) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki.server_cert, pki.server_key)
    return ctx


def _htpasswd(users: dict[str, str]) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt

    lines = []
    for name, password in users.items():
        hashed = crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=1 << 5))
        lines.append(f"{name}:{hashed}")
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def run_registry(
    workdir: Path,
    pki: Pki,
    *,
    client_cas: bool = False,
    auth: str | None = None,
    users: dict[str, str] | None = None,
    anonymous_pull: bool = True,
    redirect: bool = False,
) -> Iterator[Registry]:
    """Start docker-registry on 127.0.0.1 (TLS with ``pki``); stop it (and the helpers) afterwards."""
    if not registry_available():
        raise RuntimeError(f"{REGISTRY_BIN} is missing: apt-get install docker-registry (scripts/setup.sh does)")
    if auth not in (None, "token", "basic"):
        raise ValueError(f"auth must be None, 'token' or 'basic', not {auth!r}")
    workdir.mkdir(parents=True, exist_ok=True)
    storage = workdir / "storage"
    storage.mkdir(exist_ok=True)
    accounts = {PUSHER[0]: PUSHER[1], **(users or {})}
    port = free_port()
    config: dict[str, Any] = {
        "version": 0.1,
        "log": {"level": "warn", "accesslog": {"disabled": True}},
        "storage": {
            "filesystem": {"rootdirectory": str(storage)},
            "delete": {"enabled": True},
            "maintenance": {"uploadpurging": {"enabled": False}},
        },
        "http": {
            "addr": f"127.0.0.1:{port}",
            "secret": secrets.token_hex(16),
            "tls": {"certificate": str(pki.server_cert), "key": str(pki.server_key)},
        },
    }
    if client_cas:
        config["http"]["tls"]["clientcas"] = [str(pki.ca_cert)]
    with contextlib.ExitStack() as stack:
        token_server: TokenServer | None = None
        cdn: CdnServer | None = None
        if auth == "token":
            issuer = TokenIssuer(workdir)
            token_server = TokenServer(issuer, _server_context(pki), accounts, anonymous_pull)
            stack.enter_context(_serving(token_server))
            host, tport = token_server.server_address[:2]
            config["auth"] = {
                "token": {
                    "realm": f"https://{host!s}:{tport}/token",
                    "service": SERVICE,
                    "issuer": ISSUER,
                    "rootcertbundle": str(issuer.cert_path),
                }
            }
        elif auth == "basic":
            htpasswd = workdir / "htpasswd"
            htpasswd.write_text(_htpasswd(accounts))
            config["auth"] = {"htpasswd": {"realm": "kubeos-test", "path": str(htpasswd)}}
        if redirect:
            cdn = CdnServer(storage, _server_context(pki))
            stack.enter_context(_serving(cdn))
            host, cport = cdn.server_address[:2]
            config["middleware"] = {
                "storage": [{"name": "redirect", "options": {"baseurl": f"https://{host!s}:{cport}/"}}]
            }
        else:
            config["storage"]["redirect"] = {"disable": True}
        config_file = workdir / "config.yml"
        config_file.write_text(json.dumps(config, indent=2))  # JSON is YAML
        log = workdir / "registry.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen([REGISTRY_BIN, "serve", str(config_file)], stdout=out, stderr=out, cwd=workdir)
        try:
            registry = Registry(
                host=f"127.0.0.1:{port}",
                storage=storage,
                pki=pki,
                log=log,
                client_cas=client_cas,
                auth=auth,
                token_server=token_server,
                cdn=cdn,
            )
            _wait_ready(registry, proc)
            yield registry
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def _wait_ready(registry: Registry, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"docker-registry exited with {proc.returncode}: {registry.log.read_text()[-2000:]}")
        try:
            status, _, _ = registry.request("GET", "/v2/")
            if status in (200, 401):
                return
        except (OSError, ssl.SSLError, http.client.HTTPException):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"docker-registry did not answer within {timeout} s: {registry.log.read_text()[-2000:]}")
        time.sleep(0.05)


# --- trees for the tests --------------------------------------------------------------------------------------


def tar_members(data: bytes) -> list[str]:
    """Member names of a (possibly gzip-compressed) tar, to check what a test layer holds."""
    raw = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        return tar.getnames()


def copy_tree(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, symlinks=True)
