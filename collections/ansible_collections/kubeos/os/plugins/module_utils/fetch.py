# Copyright: kubeos contributors
# Apache License 2.0 (see LICENSE)
"""Open an OS image source (``file://``, ``https://``, ``http://`` when allowed) as a byte stream.

The stream is never read into memory as a whole: callers pull it block by block with
``read``/``readinto`` while they hash and write it.  Every failure to reach or read the
source becomes a :class:`SourceError` that names the URL, what went wrong and what to do.
"""

from __future__ import annotations

__metaclass__ = type

import errno
import http.client
import os
import socket
import ssl
import stat
import urllib.parse
from dataclasses import dataclass
from types import TracebackType
from typing import Mapping, Optional, Union

MAX_REDIRECTS = 5
USER_AGENT = "kubeos-slot-write/1"


@dataclass
class SourceOptions:
    """Where the image comes from and how to reach it.

    ``ca_cert`` replaces the system trust store for ``https://`` when given.  ``client_cert``
    and ``client_key`` (PEM files) are presented for mutual TLS; ``client_key`` may be
    omitted when the key is in the certificate file.  ``allow_insecure_http`` is KubeOS's
    ``flagSafe``: without it plain ``http://`` is refused.
    """

    url: str
    ca_cert: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    allow_insecure_http: bool = False
    timeout: float = 60.0


class SourceError(Exception):
    """The image source could not be opened or read."""


class ImageSource:
    """A readable image stream with a known or unknown length (base class of the sources)."""

    url: str
    length: int | None

    def __init__(self, url: str, length: int | None) -> None:
        self.url = url
        self.length = length

    def readinto(self, buf: Union[bytearray, memoryview]) -> int:  # pragma: no cover - abstract
        """Read up to ``len(buf)`` bytes into ``buf``; 0 means end of stream."""
        raise NotImplementedError

    def read(self, n: int) -> bytes:
        """Read up to ``n`` bytes; ``b''`` means end of stream."""
        if n <= 0:
            return b""
        buf = bytearray(n)
        got = self.readinto(buf)
        del buf[got:]
        return bytes(buf)

    def close(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def __enter__(self) -> ImageSource:
        return self

    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.close()


class FileSource(ImageSource):
    """A local file or block device, read with plain ``os.readv`` into the caller's buffers."""

    def __init__(self, url: str, path: str) -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise SourceError(
                f"cannot open image {url}: {exc.strerror} ({path}); check that the file exists "
                "on the target host and is readable"
            ) from exc
        try:
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode):
                length: int | None = st.st_size
            elif stat.S_ISBLK(st.st_mode):
                length = os.lseek(fd, 0, os.SEEK_END)
                os.lseek(fd, 0, os.SEEK_SET)
            elif stat.S_ISDIR(st.st_mode):
                raise SourceError(f"image {url} is a directory; point the URL at the image file")
            else:
                length = None
            if hasattr(os, "posix_fadvise") and length is not None:
                # Doubles the kernel read-ahead window: the image is read once, front to back.
                # (Pipes and sockets have no read-ahead: fadvise fails there with ESPIPE.)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        except OSError as exc:
            os.close(fd)
            raise SourceError(f"cannot read image {url}: {exc.strerror} ({path})") from exc
        except BaseException:
            os.close(fd)
            raise
        super().__init__(url, length)
        self._fd: int | None = fd

    def readinto(self, buf: Union[bytearray, memoryview]) -> int:
        if self._fd is None:
            raise SourceError(f"image {self.url} was already closed")
        try:
            return os.readv(self._fd, [buf])
        except OSError as exc:
            raise SourceError(f"reading image {self.url} failed: {exc.strerror}") from exc

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


class HttpSource(ImageSource):
    """The body of an HTTP(S) response, read straight from the socket."""

    def __init__(self, url: str, conn: http.client.HTTPConnection, response: http.client.HTTPResponse) -> None:
        length_header = response.getheader("Content-Length")
        length: int | None = None
        if length_header is not None and response.getheader("Transfer-Encoding") is None:
            try:
                length = int(length_header)
            except ValueError:
                length = None
        super().__init__(url, length)
        self._conn: http.client.HTTPConnection | None = conn
        self._response = response
        self._received = 0

    def readinto(self, buf: Union[bytearray, memoryview]) -> int:
        if self._conn is None:
            raise SourceError(f"image {self.url} was already closed")
        try:
            n = self._response.readinto(buf)
        except http.client.IncompleteRead as exc:
            raise SourceError(
                f"download of {self.url} broke off after {self._received} bytes: the server closed "
                "the connection in the middle of the image; retry"
            ) from exc
        except ssl.SSLError as exc:
            raise SourceError(f"TLS error while downloading {self.url}: {_ssl_reason(exc)}") from exc
        except (OSError, http.client.HTTPException) as exc:
            raise SourceError(f"download of {self.url} failed: {_os_reason(exc)}; retry") from exc
        if n == 0 and len(buf) and self.length is not None and self._received < self.length:
            raise SourceError(
                f"download of {self.url} broke off after {self._received} of {self.length} bytes: "
                "the server closed the connection in the middle of the image; retry"
            )
        self._received += n
        return n

    def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            self._response.close()
            conn.close()


def open_source(opts: SourceOptions) -> ImageSource:
    """Open ``opts.url`` for streaming; raise :class:`SourceError` if it cannot be used."""
    parsed = urllib.parse.urlsplit(opts.url)
    scheme = parsed.scheme.lower()
    if scheme == "file":
        return FileSource(opts.url, _file_path(opts.url, parsed))
    if scheme in ("http", "https"):
        return _open_http(opts, opts.url)
    if not scheme:
        raise SourceError(
            f"image URL {opts.url!r} has no scheme; use https://host/path, or file:///absolute/path "
            "for a file on the target host"
        )
    raise SourceError(
        f"image URL {opts.url!r} uses the unsupported scheme {scheme!r}; use https:// "
        "(or http:// with allow_insecure_http, or file:///absolute/path)"
    )


def _file_path(url: str, parsed: urllib.parse.SplitResult) -> str:
    if parsed.netloc not in ("", "localhost"):
        raise SourceError(
            f"file URL {url!r} names the host {parsed.netloc!r}; a file URL must hold an absolute "
            "path on the target host: file:///path/to/image (three slashes)"
        )
    if parsed.query or parsed.fragment:
        raise SourceError(f"file URL {url!r} has a query or fragment; give only file:///path/to/image")
    path = urllib.parse.unquote(parsed.path)
    if not path.startswith("/"):
        raise SourceError(
            f"file URL {url!r} does not hold an absolute path; write file:///path/to/image (three slashes)"
        )
    if "\x00" in path:
        raise SourceError(f"file URL {url!r} contains a NUL byte")
    return path


def ssl_context(opts: SourceOptions, url: str) -> ssl.SSLContext:
    """The TLS context for ``opts``: its CA (or the system's), hostname checks, its client certificate."""
    try:
        ctx = ssl.create_default_context(purpose=ssl.Purpose.SERVER_AUTH, cafile=opts.ca_cert)
    except (OSError, ssl.SSLError) as exc:
        raise SourceError(
            f"cannot load the CA certificate {opts.ca_cert!r} for {url}: {_os_reason(exc)}; give a readable PEM file"
        ) from exc
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    if opts.client_key and not opts.client_cert:
        raise SourceError(f"a client key was given for {url} but no client certificate; give both for mTLS")
    if opts.client_cert:
        try:
            ctx.load_cert_chain(certfile=opts.client_cert, keyfile=opts.client_key or None)
        except (OSError, ssl.SSLError) as exc:
            raise SourceError(
                f"cannot load the client certificate {opts.client_cert!r} / key {opts.client_key!r} "
                f"for {url}: {_os_reason(exc)}; give matching, readable PEM files"
            ) from exc
    return ctx


def _open_http(opts: SourceOptions, url: str) -> ImageSource:
    ctx: ssl.SSLContext | None = None
    for _redirect in range(MAX_REDIRECTS + 1):
        parsed = urllib.parse.urlsplit(url)
        scheme = parsed.scheme.lower()
        if scheme == "http" and not opts.allow_insecure_http:
            raise SourceError(
                f"refusing plain http:// for {url}: the image would travel unauthenticated; "
                "use an https:// URL, or set allow_insecure_http (KubeOS flagSafe) if you accept the risk"
            )
        if scheme not in ("http", "https"):
            raise SourceError(f"{opts.url} redirected to the unsupported URL {url!r}")
        if parsed.username is not None:
            raise SourceError(f"image URL {_redact(url)!r} carries credentials; use mTLS client certificates instead")
        if scheme == "https" and ctx is None:
            ctx = ssl_context(opts, url)
        conn, response = send_request(opts, url, ctx)
        status = response.status
        if status in (301, 302, 303, 307, 308):
            location = response.getheader("Location")
            response.close()
            conn.close()
            if not location:
                raise SourceError(f"{url} answered {status} {response.reason} without a Location header")
            url = urllib.parse.urljoin(url, location)
            continue
        if status != 200:
            reason = response.reason
            response.close()
            conn.close()
            raise SourceError(f"cannot download {url}: the server answered {status} {reason}{_status_hint(status)}")
        return HttpSource(url, conn, response)
    raise SourceError(f"{opts.url} redirected more than {MAX_REDIRECTS} times; give the final URL")


def send_request(
    opts: SourceOptions,
    url: str,
    ctx: ssl.SSLContext | None,
    headers: Mapping[str, str] | None = None,
) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    """Send one GET for ``url`` and read the response head; the caller reads the body and closes both.

    ``ctx`` (from :func:`ssl_context`) is used for ``https://``.  No redirect is followed and the status is
    not checked.  Connection and TLS failures become a :class:`SourceError` that says what to do.
    """
    parsed = urllib.parse.urlsplit(url)
    host = parsed.hostname
    if not host:
        raise SourceError(f"image URL {url!r} has no host name")
    try:
        port = parsed.port
    except ValueError as exc:
        raise SourceError(f"image URL {url!r} has an invalid port") from exc
    target = urllib.parse.urlunsplit(("", "", parsed.path or "/", parsed.query, ""))
    conn: http.client.HTTPConnection
    if parsed.scheme.lower() == "https":
        if ctx is None:
            ctx = ssl_context(opts, url)
        conn = http.client.HTTPSConnection(host, port, timeout=opts.timeout, context=ctx)
    else:
        conn = http.client.HTTPConnection(host, port, timeout=opts.timeout)
    try:
        conn.putrequest("GET", target, skip_accept_encoding=True)
        conn.putheader("User-Agent", USER_AGENT)
        conn.putheader("Accept-Encoding", "identity")
        for name, value in (headers or {}).items():
            conn.putheader(name, value)
        conn.endheaders()
        response = conn.getresponse()
    except ssl.SSLCertVerificationError as exc:
        conn.close()
        raise SourceError(
            f"cannot download {url}: the server certificate was not accepted "
            f"({exc.verify_message or _ssl_reason(exc)}); give the CA that signed it as the CA "
            "certificate, and use the host name the certificate was issued for"
        ) from exc
    except ssl.SSLError as exc:
        conn.close()
        raise SourceError(
            f"cannot download {url}: TLS handshake failed ({_ssl_reason(exc)}); " + _tls_hint(opts)
        ) from exc
    except (OSError, http.client.HTTPException) as exc:
        conn.close()
        raise SourceError(f"cannot download {url}: {_os_reason(exc)}" + _conn_hint(exc, opts)) from exc
    return conn, response


def _redact(url: str) -> str:
    parsed = urllib.parse.urlsplit(url)
    netloc = parsed.hostname or ""
    if parsed.port is not None:
        netloc += f":{parsed.port}"
    return urllib.parse.urlunsplit((parsed.scheme, netloc, parsed.path, parsed.query, parsed.fragment))


def _ssl_reason(exc: ssl.SSLError) -> str:
    reason = getattr(exc, "reason", None)
    return str(reason) if reason else str(exc)


def _os_reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return _ssl_reason(exc)
    if isinstance(exc, socket.timeout):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _tls_hint(opts: SourceOptions) -> str:
    if opts.client_cert:
        return "check that the server trusts the CA of the client certificate and that the certificate is valid"
    return "the server may require a client certificate (mTLS): give client_cert and client_key"


def _conn_hint(exc: BaseException, opts: SourceOptions) -> str:
    if isinstance(exc, ConnectionResetError) or (isinstance(exc, OSError) and exc.errno == errno.EPIPE):
        # With TLS 1.3 a server that rejects the client certificate just drops the connection.
        return "; the server closed the connection: " + _tls_hint(opts)
    if isinstance(exc, http.client.RemoteDisconnected):
        return "; the server closed the connection without answering: " + _tls_hint(opts)
    if isinstance(exc, ConnectionRefusedError):
        return "; check the host and port and that the image server is running"
    if isinstance(exc, socket.gaierror):
        return "; check the host name"
    if isinstance(exc, socket.timeout):
        return "; check the network path to the image server or raise the timeout"
    return ""


def _status_hint(status: int) -> str:
    if status == 404:
        return "; check the image URL"
    if status in (401, 403):
        return "; check that this node's client certificate is allowed to fetch the image"
    if status >= 500:
        return "; the image server failed, retry later"
    return ""
