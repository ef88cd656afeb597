"""Scheme rules of module_utils.fetch.open_source (no network beyond a closed port on 127.0.0.1)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from ansible_collections.kubeos.os.plugins.module_utils.fetch import SourceError, SourceOptions, open_source


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_plain_http_is_refused_without_allow_insecure_http() -> None:
    with pytest.raises(SourceError) as err:
        open_source(SourceOptions(url="http://127.0.0.1:1/os.img"))
    message = str(err.value)
    assert "https" in message
    assert "allow_insecure_http" in message


def test_plain_http_is_tried_when_allow_insecure_http_is_set() -> None:
    port = _closed_port()
    url = f"http://127.0.0.1:{port}/os.img"
    with pytest.raises(SourceError) as err:
        open_source(SourceOptions(url=url, allow_insecure_http=True, timeout=5))
    assert url in str(err.value)
    assert "refused" in str(err.value).lower()


@pytest.mark.parametrize(
    "url",
    ["ftp://example.org/os.img", "s3://bucket/os.img", "oci://registry/os:1", "/var/tmp/os.img", "os.img"],
)
def test_other_schemes_are_refused(url: str) -> None:
    with pytest.raises(SourceError) as err:
        open_source(SourceOptions(url=url, allow_insecure_http=True))
    assert url in str(err.value)


@pytest.mark.parametrize("url", ["file:relative/os.img", "file://relative/os.img", "file:./os.img"])
def test_relative_file_path_is_refused(url: str) -> None:
    with pytest.raises(SourceError) as err:
        open_source(SourceOptions(url=url))
    assert "file:///" in str(err.value)


def test_file_url_streams_the_file_with_its_length(tmp_path: Path) -> None:
    data = bytes(range(256)) * 1000 + b"tail"
    image = tmp_path / "os image.img"
    image.write_bytes(data)
    url = "file://" + str(image).replace(" ", "%20")
    with open_source(SourceOptions(url=url)) as src:
        assert src.length == len(data)
        assert src.url == url
        chunks = []
        while chunk := src.read(70000):
            chunks.append(chunk)
        assert src.read(10) == b""
    assert b"".join(chunks) == data


def test_file_url_with_localhost_host_is_accepted(tmp_path: Path) -> None:
    image = tmp_path / "os.img"
    image.write_bytes(b"x" * 10)
    with open_source(SourceOptions(url=f"file://localhost{image}")) as src:
        assert src.read(100) == b"x" * 10


def test_missing_file_says_which_file(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/missing.img"
    with pytest.raises(SourceError) as err:
        open_source(SourceOptions(url=url))
    assert url in str(err.value)
    assert "No such file" in str(err.value)


def test_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="directory"):
        open_source(SourceOptions(url=f"file://{tmp_path}"))


def test_credentials_in_url_are_refused_and_not_echoed() -> None:
    with pytest.raises(SourceError) as err:
        open_source(SourceOptions(url="https://user:secret@127.0.0.1:1/os.img"))
    assert "secret" not in str(err.value)
    assert "mTLS" in str(err.value)


def test_client_key_without_certificate_is_refused() -> None:
    with pytest.raises(SourceError, match="client certificate"):
        open_source(SourceOptions(url="https://127.0.0.1:1/os.img", client_key="/etc/kubeos/node.key"))


def test_unreadable_ca_certificate_is_reported(tmp_path: Path) -> None:
    with pytest.raises(SourceError) as err:
        open_source(SourceOptions(url="https://127.0.0.1:1/os.img", ca_cert=str(tmp_path / "no-ca.pem")))
    assert "no-ca.pem" in str(err.value)
