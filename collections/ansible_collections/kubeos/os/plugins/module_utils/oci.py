# Copyright: kubeos contributors
# Apache License 2.0 (see LICENSE)
"""Pull an OS image from an OCI registry and apply its layers: a small registry client library, stdlib only.

Why it is here: KubeOS's ``imagetype`` ``docker``/``containerd`` means "a container image whose root
filesystem is the OS". kubeos pulls it straight from the registry, by digest, without a Docker or containerd
daemon. Module code runs on the managed host with Python 3.9+ and the standard library only, and no
registry client library of that kind exists, so this module *is* that library. It implements the part of
the OCI distribution specification a pull needs:

- references as Docker, Podman and KubeOS write them: ``registry.example.com:5000/kubeos/os@sha256:…``,
  ``…/os:v2`` or ``…/os`` (tag ``latest``); a first component without ``.`` or ``:`` (and not
  ``localhost``) means Docker Hub, as everywhere else;
- HTTPS only towards the registry, with the TLS and mutual-TLS handling of :mod:`fetch` (CA file, client
  certificate and key);
- authentication from the ``WWW-Authenticate`` challenge of a 401: ``Bearer`` (a pull token from the token
  service named by the challenge, anonymous or with basic credentials) and ``Basic``; a token that expired
  during a long pull is renewed on the next 401;
- manifests by digest or tag with the ``Accept`` header of all four JSON manifest types: OCI image index
  and Docker manifest list (the entry of the wanted platform is chosen, ``linux/amd64`` on such a host),
  OCI image manifest and Docker image manifest v2 schema 2 (schema 1 is refused);
- blob GETs following redirects (to a CDN or object store: the registry's ``Authorization`` header is
  never sent to another host);
- verification of everything by digest: the manifest that the reference names must hash to the expected
  digest (KubeOS's ``checksum``; a digest in the reference must be the same), every manifest and the
  config reached from it must match their descriptors, and every layer is hashed while it streams
  (:func:`imagewrite.extract_tar`) and refused when its sha256 or size differ.

Layers are applied in order, each extracted with GNU tar into a staging directory on the target
filesystem and then merged into the tree (renames, no copy) with the OCI whiteout rules: ``.wh.NAME``
deletes ``NAME`` of the layers below, ``.wh..wh..opq`` empties its directory of them. The merge works
with directory file descriptors and names of one component (``openat``/``renameat``/``unlinkat`` with
``O_NOFOLLOW``), so neither a whiteout nor a symbolic link in the image can reach outside the tree.

Use::

    pull = ImagePull(PullOptions(source=fetch.SourceOptions(url="oci://reg:5000/kubeos/os:v2", ca_cert=…),
                                 digest="sha256:…"))
    with pull:                       # resolves and verifies the manifest; opens the first layer
        apply_layers(pull, "/mnt/slot", progress=…, should_cancel=…)
"""

from __future__ import annotations

__metaclass__ = type

import base64
import contextlib
import hashlib
import http.client
import json
import os
import re
import ssl
import stat
import tempfile
import time
import urllib.parse
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Callable, Iterator, Mapping, Optional, Union

from ansible_collections.kubeos.os.plugins.module_utils import fetch, imagewrite, rootpath

SCHEME = "oci://"

MEDIA_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MEDIA_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA_DOCKER_SCHEMA1 = (
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
)
INDEX_TYPES = (MEDIA_OCI_INDEX, MEDIA_DOCKER_LIST)
MANIFEST_TYPES = (MEDIA_OCI_MANIFEST, MEDIA_DOCKER_MANIFEST)
CONFIG_TYPES = ("application/vnd.oci.image.config.v1+json", "application/vnd.docker.container.image.v1+json")
LAYER_TYPES = (
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.diff.tar",
)
MANIFEST_ACCEPT = ", ".join((MEDIA_OCI_INDEX, MEDIA_DOCKER_LIST, MEDIA_OCI_MANIFEST, MEDIA_DOCKER_MANIFEST))

MAX_MANIFEST_BYTES = 4 * 1024 * 1024  # what registries accept
MAX_CONFIG_BYTES = 16 * 1024 * 1024
MAX_TOKEN_BYTES = 1024 * 1024
MAX_ERROR_BYTES = 64 * 1024
MAX_REDIRECTS = 5
MAX_INDEX_DEPTH = 2

DOCKER_HUB = "docker.io"
DOCKER_HUB_ENDPOINT = "registry-1.docker.io"

WHITEOUT_PREFIX = ".wh."
WHITEOUT_META_PREFIX = ".wh..wh."
WHITEOUT_OPAQUE = ".wh..wh..opq"
STAGING_PREFIX = ".kubeos-layer-"

_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_COMPONENT_RE = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_DOMAIN_RE = re.compile(r"^(?:" + _LABEL + r"(?:\." + _LABEL + r")*|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?$")
_TOKEN_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_SAFE_TOKEN_RE = re.compile(r"^[\x21-\x7e]+$")

_ARCHITECTURES = {
    "x86_64": ("amd64", None),
    "amd64": ("amd64", None),
    "aarch64": ("arm64", None),
    "arm64": ("arm64", None),
    "armv7l": ("arm", "v7"),
    "armv6l": ("arm", "v6"),
    "i386": ("386", None),
    "i686": ("386", None),
    "ppc64le": ("ppc64le", None),
    "s390x": ("s390x", None),
    "riscv64": ("riscv64", None),
}

ProgressCallback = Callable[[int, Optional[int]], None]
CancelCallback = Callable[[], bool]


class OciError(fetch.SourceError):
    """The image cannot be pulled: bad reference, registry refusal, unsupported or inconsistent manifest."""


class DigestMismatch(OciError):
    """Something the registry sent does not hash to the digest that names it."""


class LayerError(imagewrite.WriteError):
    """A layer could not be applied to the tree (malformed whiteout, I/O error while merging)."""


# --- references ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reference:
    """``domain/repository[:tag][@digest]``; ``domain`` as written (``docker.io`` for Docker Hub)."""

    domain: str
    repository: str
    tag: Optional[str] = None
    digest: Optional[str] = None

    @property
    def endpoint(self) -> str:
        """``host[:port]`` of the registry API."""
        return DOCKER_HUB_ENDPOINT if self.domain == DOCKER_HUB else self.domain

    @property
    def base_url(self) -> str:
        return f"https://{self.endpoint}"

    @property
    def name(self) -> str:
        return f"{self.domain}/{self.repository}"

    def pinned(self, digest: str) -> str:
        """The reference by digest: ``domain/repository@sha256:…``."""
        return f"{self.name}@{digest}"

    def __str__(self) -> str:
        text = self.name
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def is_oci_url(url: str) -> bool:
    return url[: len(SCHEME)].lower() == SCHEME


def normalize_digest(value: str, what: str = "digest") -> str:
    """``'sha256:ABC…'`` or ``'abc…'`` → ``'sha256:abc…'``; OciError unless it is a sha256 digest."""
    text = value.strip()
    if text[:7].lower() == "sha256:":
        text = text[7:]
    text = "sha256:" + text.lower()
    if not _DIGEST_RE.match(text):
        raise OciError(f"{what} {value!r} is not a sha256 digest: give sha256: and 64 hex digits")
    return text


def parse_reference(text: str) -> Reference:
    """Parse an image reference, with or without ``oci://`` in front; OciError says what is wrong."""
    raw = text.strip()
    if is_oci_url(raw):
        raw = raw[len(SCHEME) :]
    hint = "write it as registry.example.com[:port]/repository[:tag][@sha256:digest]"
    if not raw:
        raise OciError(f"the image reference {text!r} is empty; {hint}")
    if any(c.isspace() or ord(c) < 0x20 for c in raw) or "://" in raw:
        raise OciError(f"the image reference {text!r} is not valid; {hint}")
    name, at, digest_part = raw.partition("@")
    digest: Optional[str] = None
    if at:
        if "@" in digest_part or not digest_part.startswith("sha256:"):
            raise OciError(
                f"the image reference {text!r} has an invalid digest (only sha256 is supported, and no "
                f"credentials in references); {hint}"
            )
        digest = normalize_digest(digest_part, "the digest of the image reference")
    tag: Optional[str] = None
    slash, colon = name.rfind("/"), name.rfind(":")
    if colon > slash:
        name, tag = name[:colon], name[colon + 1 :]
        if not _TAG_RE.match(tag):
            raise OciError(f"the image reference {text!r} has an invalid tag {tag!r}; {hint}")
    first, sep, rest = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost" or first.startswith("[")):
        domain, path = first, rest
    else:
        domain, path = DOCKER_HUB, name
    if not _DOMAIN_RE.match(domain):
        raise OciError(f"the image reference {text!r} names the invalid registry {domain!r}; {hint}")
    components = path.split("/")
    if not path or len(path) > 255 or not all(_COMPONENT_RE.match(c) for c in components):
        raise OciError(
            f"the image reference {text!r} has an invalid repository {path!r} (lower-case letters, digits and "
            f"separators . _ __ - between path components); {hint}"
        )
    if domain == DOCKER_HUB and len(components) == 1:
        path = f"library/{path}"
    return Reference(domain=domain, repository=path, tag=tag, digest=digest)


# --- platforms -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: Optional[str] = None

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)

    def matches(self, other: Mapping[str, Any]) -> bool:
        if other.get("os") != self.os or other.get("architecture") != self.architecture:
            return False
        return self.variant is None or other.get("variant") in (None, "", self.variant)


def parse_platform(text: str) -> Platform:
    parts = text.strip().split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise OciError(f"platform {text!r} is not valid: write os/architecture[/variant], e.g. linux/amd64")
    return Platform(parts[0], parts[1], parts[2] if len(parts) == 3 else None)


def host_platform() -> Platform:
    """The platform of this host, as image indexes name it (``linux/amd64`` on x86-64)."""
    machine = os.uname().machine
    arch, variant = _ARCHITECTURES.get(machine, (machine, None))
    return Platform("linux", arch, variant)


def _platform_text(value: Any) -> str:
    if not isinstance(value, dict):
        return "unknown"
    return "/".join(str(value[k]) for k in ("os", "architecture", "variant") if value.get(k)) or "unknown"


# --- descriptors and the resolved image --------------------------------------------------------------


@dataclass
class Descriptor:
    media_type: str
    digest: str
    size: int
    platform: dict[str, Any] = field(default_factory=dict)
    urls: list[str] = field(default_factory=list)
    annotations: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Any, what: str) -> Descriptor:
        if not isinstance(data, dict):
            raise OciError(f"{what} is not a descriptor (a JSON object)")
        digest = data.get("digest")
        size = data.get("size")
        if not isinstance(digest, str) or not _DIGEST_RE.match(digest):
            raise OciError(f"{what} has the digest {digest!r}; only sha256 digests are supported")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise OciError(f"{what} has an invalid size {size!r}")
        media_type = data.get("mediaType", "")
        platform = data.get("platform")
        urls = data.get("urls")
        annotations = data.get("annotations")
        return cls(
            media_type=media_type if isinstance(media_type, str) else "",
            digest=digest,
            size=size,
            platform=platform if isinstance(platform, dict) else {},
            urls=[u for u in urls if isinstance(u, str)] if isinstance(urls, list) else [],
            annotations=annotations if isinstance(annotations, dict) else {},
        )

    @property
    def short(self) -> str:
        return self.digest[7:19]


@dataclass
class Image:
    """An image resolved from a reference and verified down to its layer descriptors."""

    reference: Reference
    digest: str  # what the reference names and the checksum is: the index or the manifest
    manifest_digest: str  # the image manifest of the chosen platform (== digest without an index)
    media_type: str  # of ``digest``
    platform: str
    config: dict[str, Any]
    layers: list[Descriptor]

    @property
    def pinned(self) -> str:
        return self.reference.pinned(self.digest)

    @property
    def size(self) -> int:
        return sum(layer.size for layer in self.layers)


# --- WWW-Authenticate --------------------------------------------------------------------------------


def parse_challenges(values: list[str]) -> list[tuple[str, dict[str, str]]]:
    """``WWW-Authenticate`` header values → ``[(scheme in lower case, {param: value}), …]`` (RFC 7235).

    ``Bearer realm="https://auth.example/token",service="registry",scope="repository:a/b:pull"``; several
    challenges may share one header. Quoted values may hold commas and backslash escapes; unquoted ones
    end at the next comma.
    """
    challenges: list[tuple[str, dict[str, str]]] = []
    for text in values:
        current: Optional[tuple[str, dict[str, str]]] = None
        i, n = 0, len(text)
        while i < n:
            while i < n and text[i] in " \t,":
                i += 1
            m = _TOKEN_RE.match(text, i)
            if not m:
                break
            word, i = m.group(), m.end()
            j = i
            while j < n and text[j] in " \t":
                j += 1
            if current is None or j >= n or text[j] != "=":
                current = (word.lower(), {})
                challenges.append(current)
                continue
            j += 1
            while j < n and text[j] in " \t":
                j += 1
            if j < n and text[j] == '"':
                j += 1
                chars: list[str] = []
                while j < n and text[j] != '"':
                    if text[j] == "\\" and j + 1 < n:
                        j += 1
                    chars.append(text[j])
                    j += 1
                value, i = "".join(chars), j + 1
            else:
                # A token by the RFC; leniently, anything up to the next comma (an unquoted URL).
                end = text.find(",", j)
                end = n if end < 0 else end
                value, i = text[j:end].strip(), end
            current[1][word.lower()] = value
    return challenges


# --- the registry client -----------------------------------------------------------------------------


@dataclass
class PullOptions:
    """What to pull and how to reach the registry.

    ``source.url`` is ``oci://`` followed by the image reference; ``source.ca_cert``/``client_cert``/
    ``client_key`` and ``timeout`` apply to every connection (registry, token service, blob redirects).
    ``source.allow_insecure_http`` only allows a plain ``http://`` token service or blob redirect (never
    with credentials): the registry itself is always reached over HTTPS. ``digest`` is the digest that
    the reference must resolve to (KubeOS's ``checksum``).
    """

    source: fetch.SourceOptions
    digest: str
    username: Optional[str] = None
    password: Optional[str] = None
    platform: Optional[str] = None


class RegistryClient:
    """GETs against one repository of one registry, authenticated as its challenges ask."""

    def __init__(self, reference: Reference, opts: PullOptions) -> None:
        self.reference = reference
        self.opts = opts
        self._source = opts.source
        self._authorization: Optional[str] = None
        self._ctx: Optional[ssl.SSLContext] = None
        origin = urllib.parse.urlsplit(reference.base_url)
        self._origin = _origin(origin)
        if (opts.username is None) != (opts.password is None):
            raise OciError("give both a registry user name and a password, or neither")

    # - requests

    def _context(self, url: str) -> ssl.SSLContext:
        if self._ctx is None:
            self._ctx = fetch.ssl_context(self._source, url)
        return self._ctx

    def _send(self, url: str, headers: dict[str, str]) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        scheme = urllib.parse.urlsplit(url).scheme.lower()
        if scheme == "http":
            if not self._source.allow_insecure_http:
                raise OciError(
                    f"refusing plain http:// for {_redact(url)}: use a registry whose token service and blob "
                    "storage speak https://, or set allow_insecure_http (KubeOS flagSafe) if you accept that"
                )
            if "Authorization" in headers:
                raise OciError(f"refusing to send registry credentials over plain http:// to {_redact(url)}")
        elif scheme != "https":
            raise OciError(f"the registry sent the unsupported URL {_redact(url)!r}")
        return fetch.send_request(self._source, url, self._context(url) if scheme == "https" else None, headers)

    def get(
        self, url: str, *, accept: Optional[str] = None
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """GET ``url`` of the registry: authenticates on a 401 (once), follows redirects.

        Returns the open connection and response of the final answer, whatever its status.
        """
        tried_auth = False
        hops = 0
        while True:
            same_origin = _origin(urllib.parse.urlsplit(url)) == self._origin
            headers: dict[str, str] = {}
            if accept:
                headers["Accept"] = accept
            if same_origin and self._authorization:
                headers["Authorization"] = self._authorization
            conn, resp = self._send(url, headers)
            status = resp.status
            if status == 401 and same_origin and not tried_auth:
                challenges = resp.headers.get_all("WWW-Authenticate") or []
                _close(conn, resp)
                self._authenticate(challenges, url)
                tried_auth = True
                continue
            if status in (301, 302, 303, 307, 308):
                location = resp.getheader("Location")
                _close(conn, resp)
                if not location:
                    raise OciError(f"{_redact(url)} answered {status} without a Location header")
                hops += 1
                if hops > MAX_REDIRECTS:
                    raise OciError(f"{_redact(url)} redirected more than {MAX_REDIRECTS} times")
                url = urllib.parse.urljoin(url, location)
                continue
            return conn, resp

    def _authenticate(self, values: list[str], url: str) -> None:
        challenges = parse_challenges(values)
        by_scheme = dict(reversed(challenges))  # the first challenge of a scheme wins
        registry = self.reference.endpoint
        if "bearer" in by_scheme:
            params = by_scheme["bearer"]
            realm = params.get("realm")
            if not realm:
                raise OciError(f"registry {registry} asked for a Bearer token without naming its token service (realm)")
            self._authorization = "Bearer " + self._fetch_token(realm, params.get("service"))
            return
        if "basic" in by_scheme:
            if self.opts.username is None:
                raise OciError(
                    f"registry {registry} asks for a user name and password to pull {self.reference.repository}: "
                    "give registry_username and registry_password"
                )
            self._authorization = self._basic()
            return
        shown = ", ".join(values) or "no WWW-Authenticate header"
        raise OciError(f"registry {registry} refused {_redact(url)} (401) with no usable challenge ({shown})")

    def _basic(self) -> str:
        pair = f"{self.opts.username}:{self.opts.password}".encode()
        return "Basic " + base64.b64encode(pair).decode("ascii")

    def _fetch_token(self, realm: str, service: Optional[str]) -> str:
        query: dict[str, str] = {"scope": f"repository:{self.reference.repository}:pull"}
        if service:
            query = {"service": service, **query}
        split = urllib.parse.urlsplit(realm)
        joined = "&".join(p for p in (split.query, urllib.parse.urlencode(query)) if p)
        url = urllib.parse.urlunsplit((split.scheme, split.netloc, split.path, joined, ""))
        headers: dict[str, str] = {"Accept": "application/json"}
        if self.opts.username is not None:
            headers["Authorization"] = self._basic()
        conn, resp = self._send(url, headers)
        try:
            if resp.status != 200:
                detail = _error_detail(resp)
                if resp.status in (401, 403):
                    who = "these credentials" if self.opts.username is not None else "anonymous pulls"
                    raise OciError(
                        f"the token service {_redact(realm)} of registry {self.reference.endpoint} refused "
                        f"{who} for {self.reference.repository} ({resp.status}{detail}): "
                        + (
                            "check registry_username and registry_password"
                            if self.opts.username is not None
                            else "give registry_username and registry_password"
                        )
                    )
                raise OciError(f"the token service {_redact(realm)} answered {resp.status} {resp.reason}{detail}")
            body = _read_limited(resp, MAX_TOKEN_BYTES, f"the answer of the token service {_redact(realm)}")
        finally:
            _close(conn, resp)
        try:
            data = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise OciError(f"the token service {_redact(realm)} did not answer JSON") from exc
        token = data.get("token") or data.get("access_token") if isinstance(data, dict) else None
        if not isinstance(token, str) or not _SAFE_TOKEN_RE.match(token):
            raise OciError(f"the token service {_redact(realm)} answered without a usable token")
        return token

    # - manifests and blobs

    def manifest(self, ref: str) -> tuple[bytes, str]:
        """The manifest ``ref`` (tag or digest) as bytes, and its media type from Content-Type."""
        url = f"{self.reference.base_url}/v2/{self.reference.repository}/manifests/{ref}"
        conn, resp = self.get(url, accept=MANIFEST_ACCEPT)
        try:
            if resp.status != 200:
                shown = self.reference.pinned(ref) if ref.startswith("sha256:") else f"{self.reference.name}:{ref}"
                raise self._refusal(resp, f"the manifest {shown}")
            body = _read_limited(resp, MAX_MANIFEST_BYTES, f"the manifest {ref}")
            ctype = (resp.getheader("Content-Type") or "").split(";")[0].strip()
        finally:
            _close(conn, resp)
        return body, ctype

    def open_blob(self, desc: Descriptor) -> BlobStream:
        """A stream of the blob ``desc``: exactly ``desc.size`` bytes, or a SourceError."""
        url = f"{self.reference.base_url}/v2/{self.reference.repository}/blobs/{desc.digest}"
        conn, resp = self.get(url)
        if resp.status != 200:
            try:
                raise self._refusal(resp, f"the blob {desc.digest}")
            finally:
                _close(conn, resp)
        return BlobStream(url, conn, resp, desc)

    def blob_bytes(self, desc: Descriptor, limit: int, what: str) -> bytes:
        """A small blob (a config), read whole and verified against its descriptor."""
        if desc.size > limit:
            raise OciError(f"{what} {desc.digest} is {desc.size} bytes, more than the {limit} bytes allowed")
        with self.open_blob(desc) as stream:
            chunks: list[bytes] = []
            while True:
                data = stream.read(1024 * 1024)
                if not data:
                    break
                chunks.append(data)
        body = b"".join(chunks)
        _verify(body, desc.digest, what)
        return body

    def _refusal(self, resp: http.client.HTTPResponse, what: str) -> OciError:
        detail = _error_detail(resp)
        status = resp.status
        registry = self.reference.endpoint
        if status == 404:
            return OciError(f"{what} is not in registry {registry} (404{detail}): check the repository, tag and digest")
        if status == 401:
            return OciError(
                f"registry {registry} refused {what} (401{detail}): "
                + (
                    "check registry_username and registry_password"
                    if self.opts.username is not None
                    else "it needs credentials: give registry_username and registry_password"
                )
            )
        if status == 403:
            return OciError(
                f"registry {registry} denied access to {what} (403{detail}): check that these credentials "
                "(or this node's client certificate) may pull the repository"
            )
        hint = "; the registry failed, retry later" if status >= 500 else ""
        return OciError(f"registry {registry} answered {status} {resp.reason} for {what}{detail}{hint}")


class BlobStream(fetch.ImageSource):
    """The body of a blob response, cut to exactly the descriptor's size."""

    def __init__(
        self, url: str, conn: http.client.HTTPConnection, resp: http.client.HTTPResponse, desc: Descriptor
    ) -> None:
        self._inner = fetch.HttpSource(url, conn, resp)
        if self._inner.length is not None and self._inner.length != desc.size:
            announced = self._inner.length
            self._inner.close()
            raise OciError(
                f"the registry announced {announced} bytes for blob {desc.digest} whose descriptor says "
                f"{desc.size}: the blob is not the one the manifest names"
            )
        super().__init__(url, desc.size)
        self.desc = desc
        self._left = desc.size

    def readinto(self, buf: Union[bytearray, memoryview]) -> int:
        view = memoryview(buf)
        if self._left == 0:
            if len(view) and self._inner.read(1):
                raise DigestMismatch(
                    f"blob {self.desc.digest} is longer than the {self.desc.size} bytes its descriptor says"
                )
            return 0
        want = min(len(view), self._left)
        n = self._inner.readinto(view[:want])
        if n == 0 and want:
            raise fetch.SourceError(
                f"the download of blob {self.desc.digest} broke off after {self.desc.size - self._left} of "
                f"{self.desc.size} bytes; retry"
            )
        self._left -= n
        return n

    def close(self) -> None:
        self._inner.close()


# --- resolving an image ------------------------------------------------------------------------------


class ImagePull:
    """An image resolved and verified against ``opts.digest``, whose layers can then be streamed.

    Use as a context manager: entering resolves the reference, verifies the manifest (and index) by
    digest, reads the config and opens the first layer, so that a wrong digest, a missing image, a
    refused certificate or credentials fail before the caller touches the disk.
    """

    def __init__(self, opts: PullOptions) -> None:
        self.opts = opts
        self.url = opts.source.url
        self.reference = parse_reference(opts.source.url)
        self.expected = normalize_digest(opts.digest, "the expected image digest (sha256)")
        if self.reference.digest and self.reference.digest != self.expected:
            raise DigestMismatch(
                f"the image reference {self.reference} pins {self.reference.digest} but the checksum is "
                f"{self.expected}: they must name the same image; nothing was pulled"
            )
        self.platform = parse_platform(opts.platform) if opts.platform else host_platform()
        self.client = RegistryClient(self.reference, opts)
        self.image: Optional[Image] = None
        self._first: Optional[BlobStream] = None

    @property
    def length(self) -> Optional[int]:
        return self.image.size if self.image is not None else None

    @property
    def pinned(self) -> str:
        """The image by the digest it must have: ``domain/repository@sha256:…``."""
        return self.reference.pinned(self.expected)

    def __enter__(self) -> ImagePull:
        try:
            self.image = self.resolve()
            if self.image.layers:
                self._first = self.client.open_blob(self.image.layers[0])
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._first is not None:
            first, self._first = self._first, None
            first.close()

    def resolve(self) -> Image:
        ref = self.reference
        body, ctype = self.client.manifest(ref.digest or ref.tag or "latest")
        got = _sha256(body)
        if got != self.expected:
            where = f"the tag {ref.name}:{ref.tag or 'latest'} names {got}" if not ref.digest else f"{ref} has {got}"
            raise DigestMismatch(
                f"{where}, but the checksum is {self.expected}: "
                + (
                    "the tag was moved to another image or the checksum belongs to another one; pull by digest, "
                    "or give the digest the tag has now if that image is wanted. Nothing was written"
                    if not ref.digest
                    else "the registry sent a manifest that does not match its digest. Nothing was written"
                )
            )
        doc = _manifest_json(body, f"the manifest {ref.pinned(got)}")
        media_type = _media_type(doc, ctype)
        top_type = media_type
        depth = 0
        manifest_digest = got
        while media_type in INDEX_TYPES:
            depth += 1
            if depth > MAX_INDEX_DEPTH:
                raise OciError(f"the image index of {ref.pinned(got)} nests deeper than {MAX_INDEX_DEPTH} levels")
            desc = self._choose(doc, ref.pinned(manifest_digest))
            body, ctype = self.client.manifest(desc.digest)
            _verify(body, desc.digest, f"the manifest {ref.pinned(desc.digest)}", size=desc.size)
            manifest_digest = desc.digest
            doc = _manifest_json(body, f"the manifest {ref.pinned(desc.digest)}")
            media_type = _media_type(doc, ctype or desc.media_type)
        if media_type in MEDIA_DOCKER_SCHEMA1:
            raise OciError(
                f"{ref.pinned(manifest_digest)} is a Docker schema 1 manifest, which is not supported: push the "
                "image again with a current client (Docker v2 schema 2 or OCI)"
            )
        if media_type not in MANIFEST_TYPES:
            raise OciError(
                f"{ref.pinned(manifest_digest)} has the media type {media_type or 'none'!r}, not a container image "
                "manifest (OCI image manifest or Docker v2 schema 2)"
            )
        config_desc = Descriptor.from_json(doc.get("config"), f"the config of {ref.pinned(manifest_digest)}")
        if config_desc.media_type and config_desc.media_type not in CONFIG_TYPES:
            raise OciError(
                f"{ref.pinned(manifest_digest)} is not a container image: its config has the media type "
                f"{config_desc.media_type!r}"
            )
        raw_layers = doc.get("layers")
        if not isinstance(raw_layers, list) or not raw_layers:
            raise OciError(f"{ref.pinned(manifest_digest)} has no layers: there is no root filesystem to write")
        layers = [
            Descriptor.from_json(item, f"layer {i + 1} of {ref.pinned(manifest_digest)}")
            for i, item in enumerate(raw_layers)
        ]
        for i, layer in enumerate(layers):
            if layer.media_type not in LAYER_TYPES:
                raise OciError(
                    f"layer {i + 1} ({layer.digest}) of {ref.pinned(manifest_digest)} has the media type "
                    f"{layer.media_type!r}; supported are tar layers (plain, gzip, zstd) that the registry holds"
                )
        config_body = self.client.blob_bytes(config_desc, MAX_CONFIG_BYTES, "the image config")
        config = _manifest_json(config_body, f"the config {config_desc.digest}")
        image_platform = {k: config.get(k) for k in ("os", "architecture", "variant")}
        if config.get("architecture") and config.get("os") and not self.platform.matches(image_platform):
            raise OciError(
                f"{ref.pinned(manifest_digest)} is an image for {_platform_text(image_platform)}, not for "
                f"{self.platform}: give the image of this platform (or its index)"
            )
        return Image(
            reference=ref,
            digest=got,
            manifest_digest=manifest_digest,
            media_type=top_type,
            platform=_platform_text(image_platform) if config.get("architecture") else str(self.platform),
            config=config,
            layers=layers,
        )

    def _choose(self, index: dict[str, Any], where: str) -> Descriptor:
        entries = index.get("manifests")
        if not isinstance(entries, list):
            raise OciError(f"the image index {where} has no manifests list")
        descs = [Descriptor.from_json(e, f"an entry of the image index {where}") for e in entries]
        for desc in descs:
            if self.platform.matches(desc.platform) and desc.media_type in INDEX_TYPES + MANIFEST_TYPES:
                return desc
        available = sorted({_platform_text(d.platform) for d in descs if d.platform.get("os") != "unknown"})
        raise OciError(
            f"the image index {where} holds no image for {self.platform} (it has: "
            f"{', '.join(available) or 'no platform'}); push one for this platform"
        )

    def layers(self) -> Iterator[tuple[int, Descriptor, BlobStream]]:
        """(index, descriptor, open stream) of every layer, lowest first; the caller closes each stream."""
        if self.image is None:
            raise OciError("the image was not resolved; use ImagePull as a context manager")
        for i, desc in enumerate(self.image.layers):
            if i == 0 and self._first is not None:
                stream, self._first = self._first, None
            else:
                stream = self.client.open_blob(desc)
            yield i, desc, stream


# --- applying layers -----------------------------------------------------------------------------------


def apply_layers(
    pull: ImagePull,
    root: str,
    *,
    progress: Optional[ProgressCallback] = None,
    should_cancel: Optional[CancelCallback] = None,
) -> imagewrite.WriteResult:
    """Extract every layer of ``pull`` in order into ``root`` (an empty, mounted filesystem).

    Each layer is hashed while GNU tar extracts it (a mismatch raises :class:`imagewrite.ChecksumMismatch`
    naming the layer) and merged with the whiteout rules. ``bytes_written`` is the sum of the layer
    sizes; ``sha256`` is the image digest (without ``sha256:``).
    """
    image = pull.image
    if image is None:
        raise OciError("the image was not resolved; use ImagePull as a context manager")
    start = time.monotonic()
    total = image.size
    done = 0
    count = len(image.layers)
    for i, desc, stream in pull.layers():
        offset = done

        def report(n: int, _length: Optional[int], offset: int = offset) -> None:
            if progress is not None:
                progress(offset + n, total)

        with stream:
            try:
                apply_layer(stream, desc.digest, root, progress=report, should_cancel=should_cancel)
            except imagewrite.ChecksumMismatch as exc:
                raise imagewrite.ChecksumMismatch(
                    exc.expected, exc.actual, f"layer {i + 1} of {count} of {image.pinned}"
                ) from None
        done += desc.size
    if progress is not None:
        progress(total, total)
    return imagewrite.WriteResult(bytes_written=total, sha256=image.digest[7:], seconds=time.monotonic() - start)


def apply_layer(
    stream: imagewrite.StreamSource,
    digest: str,
    root: str,
    *,
    progress: Optional[ProgressCallback] = None,
    should_cancel: Optional[CancelCallback] = None,
) -> imagewrite.WriteResult:
    """Extract one layer (a tar stream, any compression GNU tar knows) verified by ``digest``; merge it."""
    staging = tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=root)
    # Directories GNU tar makes because a member needs them (the layer does not list them) get the current
    # time, at least the staging directory's own: they must not change the directories below them.
    implicit_since = os.lstat(staging).st_mtime_ns
    result = imagewrite.extract_tar(stream, staging, digest, progress=progress, should_cancel=should_cancel)
    merge_layer(staging, root, implicit_since_ns=implicit_since)
    return result


def merge_layer(layer_dir: str, root: str, *, implicit_since_ns: Optional[int] = None) -> None:
    """Move the extracted layer at ``layer_dir`` (a directory inside ``root``) into ``root``, then remove it.

    Rules (those of containerd and Docker): ``.wh..wh..opq`` in a directory removes what the layers below
    put there; ``.wh.NAME`` removes ``NAME``; whiteouts go before the layer's own entries of the same
    directory, and never stay in the tree. A directory over a directory is merged (the layer's mode,
    owner, xattrs and times win, unless the layer does not list it: see ``implicit_since_ns``); anything
    else replaces what was there, moved by ``rename`` (no data is copied). A directory the layer does not
    list itself that meets a symbolic link follows the link when it leads to a directory inside ``root``
    (as containerd resolves parents). The root directory of the tree keeps its own metadata.
    """
    merger = _Merger(root, os.path.basename(os.path.normpath(layer_dir)), implicit_since_ns)
    if os.path.dirname(os.path.normpath(layer_dir)) != os.path.normpath(root):
        raise LayerError(f"the layer directory {layer_dir} must be directly inside {root}")
    try:
        merger.run()
    except OSError as exc:
        raise LayerError(
            f"merging a layer into {root} failed: {exc.strerror or exc} ({exc.filename or 'a file'}); "
            "the slot filesystem may be full or lack features (xattrs)"
        ) from exc


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _open_dir(name: str, dir_fd: Optional[int] = None) -> int:
    return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)


def _lstat(name: str, dir_fd: int) -> Optional[os.stat_result]:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def remove_entry(dir_fd: int, name: str) -> bool:
    """Remove ``name`` in the directory ``dir_fd`` (a whole tree for a directory; links are not followed)."""
    st = _lstat(name, dir_fd)
    if st is None:
        return False
    if stat.S_ISDIR(st.st_mode):
        fd = _open_dir(name, dir_fd)
        try:
            for child in os.listdir(fd):
                remove_entry(fd, child)
        finally:
            os.close(fd)
        os.rmdir(name, dir_fd=dir_fd)
    else:
        os.unlink(name, dir_fd=dir_fd)
    return True


class _Merger:
    def __init__(self, root: str, staging: str, implicit_since_ns: Optional[int]) -> None:
        self.root = root
        self.staging = staging
        self.implicit_since_ns = implicit_since_ns
        # Never whited out or emptied at the top: the staging directory itself, and the filesystem's own.
        self.keep_at_top = {staging, "lost+found"}
        self.root_fd = -1

    def run(self) -> None:
        root_fd = self.root_fd = _open_dir(self.root)
        try:
            layer_fd = _open_dir(self.staging, root_fd)
            try:
                self._merge(layer_fd, root_fd, ())
            finally:
                os.close(layer_fd)
            remove_entry(root_fd, self.staging)
        finally:
            os.close(root_fd)

    def _implicit(self, st: os.stat_result) -> bool:
        return self.implicit_since_ns is not None and st.st_mtime_ns >= self.implicit_since_ns

    def _merge(self, src_fd: int, dst_fd: int, rel: tuple[str, ...]) -> None:
        names = sorted(os.listdir(src_fd))
        top = not rel
        if WHITEOUT_OPAQUE in names:
            for name in os.listdir(dst_fd):
                if not (top and name in self.keep_at_top):
                    remove_entry(dst_fd, name)
        for name in names:
            if not name.startswith(WHITEOUT_PREFIX) or name.startswith(WHITEOUT_META_PREFIX):
                continue
            victim = name[len(WHITEOUT_PREFIX) :]
            if victim in ("", ".", ".."):
                raise LayerError(f"the layer holds the invalid whiteout {'/'.join((*rel, name))!r}")
            if not (top and victim in self.keep_at_top):
                remove_entry(dst_fd, victim)
        for name in names:
            if name.startswith(WHITEOUT_PREFIX):
                continue
            st = os.stat(name, dir_fd=src_fd, follow_symlinks=False)
            existing = _lstat(name, dst_fd)
            if stat.S_ISDIR(st.st_mode):
                if existing is not None and stat.S_ISDIR(existing.st_mode):
                    self._merge_into(src_fd, name, dst_fd, name, st, existing, (*rel, name))
                    continue
                if (
                    existing is not None
                    and stat.S_ISLNK(existing.st_mode)
                    and self._implicit(st)
                    and self._merge_through_link(src_fd, name, (*rel, name), st)
                ):
                    continue
            if existing is not None:
                remove_entry(dst_fd, name)
            os.rename(name, name, src_dir_fd=src_fd, dst_dir_fd=dst_fd)
            if stat.S_ISDIR(st.st_mode):
                _strip_whiteouts(dst_fd, name)

    def _merge_into(
        self,
        src_parent: int,
        src_name: str,
        dst_parent: int,
        dst_name: str,
        st: os.stat_result,
        existing: os.stat_result,
        rel: tuple[str, ...],
    ) -> None:
        src_fd = _open_dir(src_name, src_parent)
        try:
            dst_fd = _open_dir(dst_name, dst_parent)
            try:
                self._merge(src_fd, dst_fd, rel)
                if self._implicit(st):
                    os.utime(dst_fd, ns=(existing.st_atime_ns, existing.st_mtime_ns))
                else:
                    _copy_dir_metadata(src_fd, dst_fd, st)
            finally:
                os.close(dst_fd)
        finally:
            os.close(src_fd)

    def _merge_through_link(self, src_parent: int, name: str, rel: tuple[str, ...], st: os.stat_result) -> bool:
        """Merge the implicit directory ``rel`` into the directory its symbolic link leads to inside root."""
        try:
            resolved = rootpath.resolve(self.root, "/".join(rel))
        except rootpath.LinkLoopError:
            return False
        if resolved == "/" or not os.path.lexists(os.path.join(self.root, resolved.lstrip("/"))):
            return False
        inside = resolved.lstrip("/").split("/")
        if inside[0] == self.staging:
            return False
        if inside[0] in ("..", ".", self.staging):
            return False
        parent_fd = os.dup(self.root_fd)
        try:
            for part in inside[:-1]:
                try:
                    fd = _open_dir(part, parent_fd)
                except OSError:
                    return False
                os.close(parent_fd)
                parent_fd = fd
            existing = _lstat(inside[-1], parent_fd)
            if existing is None or not stat.S_ISDIR(existing.st_mode):
                return False
            self._merge_into(src_parent, name, parent_fd, inside[-1], st, existing, tuple(inside))
            return True
        finally:
            os.close(parent_fd)


def _strip_whiteouts(parent_fd: int, name: str) -> None:
    """Drop whiteout files from a directory tree that had nothing below it (they whiten nothing)."""
    fd = _open_dir(name, parent_fd)
    try:
        before = os.fstat(fd)
        removed = False
        for child in os.listdir(fd):
            if child.startswith(WHITEOUT_PREFIX):
                removed = remove_entry(fd, child) or removed
                continue
            cst = _lstat(child, fd)
            if cst is not None and stat.S_ISDIR(cst.st_mode):
                _strip_whiteouts(fd, child)
        if removed:
            os.utime(fd, ns=(before.st_atime_ns, before.st_mtime_ns))
    finally:
        os.close(fd)


def _copy_dir_metadata(src_fd: int, dst_fd: int, st: os.stat_result) -> None:
    """The layer's directory entry wins: owner, mode, xattrs (ACLs included) and times."""
    os.chown(dst_fd, st.st_uid, st.st_gid)
    os.chmod(dst_fd, stat.S_IMODE(st.st_mode))
    wanted = set(os.listxattr(src_fd))
    for attr in set(os.listxattr(dst_fd)) - wanted:
        with contextlib.suppress(OSError):
            os.removexattr(dst_fd, attr)
    for attr in sorted(wanted):
        os.setxattr(dst_fd, attr, os.getxattr(src_fd, attr))
    os.utime(dst_fd, ns=(st.st_atime_ns, st.st_mtime_ns))


# --- helpers -------------------------------------------------------------------------------------------


def _origin(parts: urllib.parse.SplitResult) -> tuple[str, str, int]:
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:
        port = None
    return scheme, (parts.hostname or "").lower(), port or (443 if scheme == "https" else 80)


def _redact(url: str) -> str:
    """No query (token services get scopes there, pre-signed blob URLs carry signatures) and no user info."""
    parts = urllib.parse.urlsplit(url)
    netloc = parts.hostname or ""
    if ":" in netloc:
        netloc = f"[{netloc}]"
    with contextlib.suppress(ValueError):
        if parts.port is not None:
            netloc += f":{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _close(conn: http.client.HTTPConnection, resp: http.client.HTTPResponse) -> None:
    with contextlib.suppress(Exception):
        resp.close()
    conn.close()


def _read_limited(resp: http.client.HTTPResponse, limit: int, what: str) -> bytes:
    try:
        body = resp.read(limit + 1)
    except (OSError, http.client.HTTPException) as exc:
        raise OciError(f"reading {what} failed: {exc}; retry") from exc
    if len(body) > limit:
        raise OciError(f"{what} is larger than {limit} bytes; refusing it")
    return body


def _error_detail(resp: http.client.HTTPResponse) -> str:
    """``': CODE message'`` from a registry's JSON error body, if there is one."""
    try:
        body = resp.read(MAX_ERROR_BYTES)
        data = json.loads(body.decode("utf-8"))
    except Exception:
        return ""
    errors = data.get("errors") if isinstance(data, dict) else None
    if isinstance(errors, list) and errors and isinstance(errors[0], dict):
        code, message = errors[0].get("code", ""), errors[0].get("message", "")
        text = " ".join(str(x) for x in (code, message) if x)
        return f": {text[:300]}" if text else ""
    if isinstance(data, dict) and isinstance(data.get("details"), str):
        return f": {data['details'][:300]}"
    return ""


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _verify(data: bytes, digest: str, what: str, *, size: Optional[int] = None) -> None:
    got = _sha256(data)
    if got != digest:
        raise DigestMismatch(
            f"{what} hashes to {got}, not to {digest}: the registry sent something else; nothing was written"
        )
    if size is not None and len(data) != size:
        raise DigestMismatch(f"{what} is {len(data)} bytes, its descriptor says {size}")


def _manifest_json(body: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise OciError(f"{what} is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise OciError(f"{what} is not a JSON object")
    return doc


def _media_type(doc: dict[str, Any], content_type: str) -> str:
    declared = doc.get("mediaType")
    if isinstance(declared, str) and declared:
        return declared
    if content_type in INDEX_TYPES + MANIFEST_TYPES + MEDIA_DOCKER_SCHEMA1:
        return content_type
    # An OCI document without mediaType: tell the kinds apart by their fields.
    if isinstance(doc.get("manifests"), list):
        return MEDIA_OCI_INDEX
    if doc.get("schemaVersion") == 2 and isinstance(doc.get("layers"), list):
        return MEDIA_OCI_MANIFEST
    return content_type
