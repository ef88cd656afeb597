"""Throw-away PKI (made with the ``openssl`` CLI) and a real HTTPS file server on 127.0.0.1 for tests.

``make_pki(directory)`` writes a test CA, a server certificate for ``127.0.0.1``/``localhost``, a client
certificate signed by the CA, and a "bad" client certificate signed by an unrelated CA.

``file_server(root, pki=...)`` serves the files under ``root`` over HTTPS (or plain HTTP when ``pki`` is
None) from a thread, optionally requiring a client certificate signed by the test CA, and yields the
base URL.  ``length_mode`` chooses how the body is framed: ``"content-length"``, ``"chunked"``
(HTTP/1.1 chunked transfer encoding) or ``"close"`` (no length, the connection close ends the body).
"""

from __future__ import annotations

import contextlib
import http.server
import os
import shutil
import socket
import ssl
import subprocess
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

_CA_EXT = """\
[req]
distinguished_name = dn
prompt = no
x509_extensions = v3_ca
[dn]
CN = {cn}
[v3_ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
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


@dataclass(frozen=True)
class Pki:
    directory: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    bad_ca_cert: Path
    bad_client_cert: Path
    bad_client_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")


def _make_ca(directory: Path, name: str, cn: str) -> tuple[Path, Path]:
    conf = directory / f"{name}.cnf"
    conf.write_text(_CA_EXT.format(cn=cn))
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    _openssl(
        "req", "-x509", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", str(key), "-out", str(cert), "-days", "3", "-config", str(conf), cwd=directory,
    )  # fmt: skip
    return cert, key


def _make_leaf(
    directory: Path, name: str, cn: str, ca: tuple[Path, Path], *, eku: str, san: str = ""
) -> tuple[Path, Path]:
    cert, key, csr = directory / f"{name}.crt", directory / f"{name}.key", directory / f"{name}.csr"
    ext = directory / f"{name}.ext"
    ext.write_text(_LEAF_EXT.format(eku=eku, san=f"subjectAltName = {san}" if san else ""))
    _openssl(
        "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={cn}", cwd=directory,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-set_serial",
        str(int.from_bytes(os.urandom(8), "big")), "-days", "2", "-sha256", "-extfile", str(ext),
        "-out", str(cert), cwd=directory,
    )  # fmt: skip
    return cert, key


def make_pki(directory: Path | str) -> Pki:
    """Create the test PKI in ``directory`` (created if missing) and return the file paths."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    ca = _make_ca(d, "ca", "kubeos test CA")
    server = _make_leaf(d, "server", "localhost", ca, eku="serverAuth", san="DNS:localhost, IP:127.0.0.1, IP:::1")
    client = _make_leaf(d, "client", "kubeos-node-1", ca, eku="clientAuth")
    bad_ca = _make_ca(d, "bad-ca", "someone else's CA")
    bad_client = _make_leaf(d, "bad-client", "kubeos-node-1", bad_ca, eku="clientAuth")
    return Pki(
        directory=d,
        ca_cert=ca[0],
        ca_key=ca[1],
        server_cert=server[0],
        server_key=server[1],
        client_cert=client[0],
        client_key=client[1],
        bad_ca_cert=bad_ca[0],
        bad_client_cert=bad_client[0],
        bad_client_key=bad_client[1],
    )


LENGTH_MODES = ("content-length", "chunked", "close")
_COPY = 256 * 1024


class _FileHandler(http.server.BaseHTTPRequestHandler):
    server: _FileServer

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def _resolve(self) -> Path | None:
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        root = self.server.root.resolve()
        candidate = (root / path.lstrip("/")).resolve()
        if root != candidate and root not in candidate.parents:
            return None
        return candidate if candidate.is_file() else None

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, *, body: bool) -> None:
        self.server.requests.append(self.path)
        mode = self.server.length_mode
        path = self._resolve()
        if path is None:
            self.send_error(404, "not found")
            return
        size = path.stat().st_size
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        if mode == "content-length":
            self.send_header("Content-Length", str(size))
        elif mode == "chunked":
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if not body:
            return
        left = size if self.server.cut_after is None else min(size, self.server.cut_after)
        with path.open("rb") as f:
            while left > 0:
                data = f.read(min(_COPY, left))
                if not data:
                    break
                left -= len(data)
                if mode == "chunked":
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                else:
                    self.wfile.write(data)
        if self.server.cut_after is not None:
            self.close_connection = True  # a broken download: the body stops short
            return
        if mode == "chunked":
            self.wfile.write(b"0\r\n\r\n")


class _FileServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path, ctx: ssl.SSLContext | None, length_mode: str, cut_after: int | None = None) -> None:
        self.root = root
        self.cut_after = cut_after
        self.ctx = ctx
        self.length_mode = length_mode
        self.requests: list[str] = []
        # Without a length the end of the body is the end of the connection: HTTP/1.0 framing.
        version = "HTTP/1.0" if length_mode == "close" else "HTTP/1.1"
        handler = type("_VersionedFileHandler", (_FileHandler,), {"protocol_version": version})
        super().__init__(("127.0.0.1", 0), handler)

    def finish_request(self, request: socket.socket, client_address: object) -> None:  # type: ignore[override]
        # The TLS handshake runs in the per-connection thread, so a client that fails it (no or a
        # wrong client certificate) cannot stall the accept loop.
        if self.ctx is not None:
            try:
                request = self.ctx.wrap_socket(request, server_side=True)
            except (ssl.SSLError, OSError):
                request.close()
                return
        try:
            super().finish_request(request, client_address)
        except (ssl.SSLError, ConnectionError, TimeoutError):
            pass
        finally:
            if self.ctx is not None:
                # The wrapped socket is ours (socketserver only closes the original one).
                with contextlib.suppress(OSError):
                    request.shutdown(socket.SHUT_RDWR)
                request.close()

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # client went away mid-body (cancel tests); not an error of the server


@dataclass
class ServerInfo:
    url: str
    server: _FileServer

    @property
    def requests(self) -> list[str]:
        return self.server.requests


@contextlib.contextmanager
def file_server(
    root: Path | str,
    *,
    pki: Pki | None = None,
    require_client_cert: bool = False,
    length_mode: str = "content-length",
    cut_after: int | None = None,
) -> Iterator[str]:
    """Serve ``root`` on 127.0.0.1 (HTTPS with ``pki``, else plain HTTP); yield the base URL.

    ``cut_after`` simulates a broken download: the connection closes after that many body bytes.
    """
    with serve(
        root, pki=pki, require_client_cert=require_client_cert, length_mode=length_mode, cut_after=cut_after
    ) as info:
        yield info.url


@contextlib.contextmanager
def serve(
    root: Path | str,
    *,
    pki: Pki | None = None,
    require_client_cert: bool = False,
    length_mode: str = "content-length",
    cut_after: int | None = None,
) -> Iterator[ServerInfo]:
    """Like :func:`file_server` but yields a :class:`ServerInfo` (URL and request log)."""
    if length_mode not in LENGTH_MODES:
        raise ValueError(f"length_mode must be one of {LENGTH_MODES}, not {length_mode!r}")
    ctx: ssl.SSLContext | None = None
    if pki is not None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(pki.server_cert, pki.server_key)
        if require_client_cert:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(cafile=str(pki.ca_cert))
    elif require_client_cert:
        raise ValueError("require_client_cert needs a pki")
    server = _FileServer(Path(root), ctx, length_mode, cut_after)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    scheme = "https" if ctx is not None else "http"
    host, port = server.server_address[:2]
    try:
        yield ServerInfo(url=f"{scheme}://{host!s}:{port}", server=server)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def openssl_available() -> bool:
    return shutil.which("openssl") is not None
