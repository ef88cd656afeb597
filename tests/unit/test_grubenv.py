"""Tests for the GRUB environment block reader/writer, checked against the real grub-editenv."""

from __future__ import annotations

import ast
import os
import random
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from ansible_collections.kubeos.os.plugins.module_utils import grubenv

GRUB_EDITENV = shutil.which("grub-editenv")
needs_editenv = pytest.mark.skipif(GRUB_EDITENV is None, reason="grub-editenv (grub-common) is not installed")

# Values that exercise grub's escaping and everything stored raw.
ODD_VALUES = {
    "plain": "A",
    "empty": "",
    "backslash": "b\\c",
    "backslashes": "\\\\x\\",
    "trailing_backslash": "x\\",
    "newline": "line1\nline2",
    "trailing_newline": "x\n",
    "only_newlines": "\n\n",
    "backslash_newline": "a\\\nb",
    "equals": "x=y=z",
    "hash": "#hash",
    "hashes": "a#b##",
    "unicode": "ü — 日本 🚀",
    "spaces": " a b\tc ",
    "carriage_return": "a\r\nb",
    "escape_lookalike": "\\n\\t",
}


def editenv(path: Path, *args: str | bytes) -> subprocess.CompletedProcess[bytes]:
    assert GRUB_EDITENV is not None
    return subprocess.run(
        [GRUB_EDITENV, os.fsencode(path), *(a if isinstance(a, bytes) else a.encode() for a in args)],
        capture_output=True,
        check=False,
        env={**os.environ, "LC_ALL": "C"},
    )


def editenv_ok(path: Path, *args: str | bytes) -> bytes:
    result = editenv(path, *args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def raw(value: str) -> bytes:
    return value.encode("utf-8", "surrogateescape")


def block(body: bytes, size: int = grubenv.GRUBENV_SIZE, pad: bytes = b"#") -> bytes:
    data = grubenv.GRUBENV_HEADER + body
    return data + pad * (size - len(data))


# --- format and round trips -------------------------------------------------------------------


def test_constants() -> None:
    assert grubenv.GRUBENV_SIZE == 1024
    assert grubenv.GRUBENV_HEADER == b"# GRUB Environment Block\n"
    assert issubclass(grubenv.GrubEnvError, ValueError)


def test_encode_empty_layout() -> None:
    data = grubenv.encode({})
    assert len(data) == 1024
    assert data.startswith(grubenv.GRUBENV_HEADER + grubenv.GRUBENV_MESSAGE)
    assert data.endswith(b"#" * 900)
    assert grubenv.parse(data) == {}


def test_encode_escapes_like_grub() -> None:
    data = grubenv.encode({"a": "b\\c", "n": "x\ny", "e": "k=v#"})
    prefix = len(grubenv.GRUBENV_HEADER + grubenv.GRUBENV_MESSAGE)
    assert data[prefix:].startswith(b"a=b\\\\c\nn=x\\\ny\ne=k=v#\n#")


@pytest.mark.parametrize("name", sorted(ODD_VALUES))
def test_round_trip_odd_value(name: str) -> None:
    env = {"before": "1", name: ODD_VALUES[name], "after": "2"}
    assert grubenv.parse(grubenv.encode(env)) == env


def test_round_trip_all_values_and_non_utf8() -> None:
    env = dict(ODD_VALUES)
    env["latin1"] = b"caf\xe9".decode("utf-8", "surrogateescape")
    decoded = grubenv.parse(grubenv.encode(env))
    assert decoded == env
    assert list(decoded) == list(env)


def test_order_is_preserved() -> None:
    names = ["zeta", "alpha", "kubeos_trial", "mid", "kubeos_default", "b", "a"]
    env = {name: str(i) for i, name in enumerate(names)}
    assert list(grubenv.parse(grubenv.encode(env))) == names


def test_update_is_pure_and_behaves_like_set_unset() -> None:
    env = {"a": "1", "b": "2", "c": "3"}
    new = grubenv.update(env, {"b": "two", "d": "4", "a": None, "missing": None})
    assert new == {"b": "two", "c": "3", "d": "4"}
    assert list(new) == ["b", "c", "d"]
    assert env == {"a": "1", "b": "2", "c": "3"}  # untouched
    assert grubenv.update(new, {"a": "again"}) == {"b": "two", "c": "3", "d": "4", "a": "again"}
    assert list(grubenv.update(new, {"a": "again"}))[-1] == "a"


def test_update_refuses_bad_names_but_can_unset_them() -> None:
    with pytest.raises(grubenv.GrubEnvError, match="contains '='"):
        grubenv.update({}, {"a=b": "1"})
    assert grubenv.update({"\nodd": "1", "ok": "2"}, {"\nodd": None}) == {"ok": "2"}


def test_render_list() -> None:
    assert grubenv.render_list({}) == ""
    assert grubenv.render_list({"a": "1", "b": "x\ny", "c": ""}) == "a=1\nb=x\ny\nc=\n"


# --- refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("", "empty"),
        ("a=b", "contains '='"),
        ("a\nb", "newline"),
        ("a\0b", "NUL"),
        ("#a", "starts with '#'"),
    ],
)
def test_bad_names_refused(name: str, why: str) -> None:
    with pytest.raises(grubenv.GrubEnvError, match=why):
        grubenv.encode({name: "v"})


def test_nul_in_value_refused() -> None:
    with pytest.raises(grubenv.GrubEnvError, match="NUL"):
        grubenv.encode({"a": "x\0y"})


def test_exact_fit_and_overflow() -> None:
    room = 1024 - len(grubenv.GRUBENV_HEADER) - len(grubenv.GRUBENV_MESSAGE)
    fits = {"v": "x" * (room - 3)}  # "v=" + value + "\n" fills the block, no padding left
    data = grubenv.encode(fits)
    assert len(data) == 1024 and data.endswith(b"x\n")
    assert grubenv.parse(data) == fits
    with pytest.raises(grubenv.GrubEnvError, match=r"\b1 byte over") as info:
        grubenv.encode({"v": "x" * (room - 2)})
    assert f"has room for {room}" in str(info.value)
    with pytest.raises(grubenv.GrubEnvError, match=r"\b58 bytes over"):
        grubenv.encode({"v": "x" * (room - 3), "w": "y" * 55})  # "w=" + 55 + "\n"


def test_overflow_counts_escapes() -> None:
    room = 1024 - len(grubenv.GRUBENV_HEADER) - len(grubenv.GRUBENV_MESSAGE)
    # every backslash takes two bytes in the block
    assert grubenv.encode({"v": "\\" * ((room - 3) // 2)})
    with pytest.raises(grubenv.GrubEnvError, match=r"\b1 byte over"):  # 2 * 464 + 3 = 931 > 930
        grubenv.encode({"v": "\\" * ((room - 3) // 2 + 1)})


@pytest.mark.parametrize("size", [0, 10, 26, grubenv.GRUBENV_MAX_SIZE + 1])
def test_encode_refuses_silly_sizes(size: int) -> None:
    with pytest.raises(grubenv.GrubEnvError):
        grubenv.encode({}, size)


def test_encode_other_sizes() -> None:
    data = grubenv.encode({"a": "1"}, 4096)
    assert len(data) == 4096
    assert grubenv.parse(data) == {"a": "1"}


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"#" * 1024,
        b"# GRUB environment block\n".ljust(1024, b"#"),
        b"\0" * 1024,
        grubenv.GRUBENV_HEADER,  # only the signature: grub-editenv refuses it too
        grubenv.GRUBENV_HEADER[:-1],
    ],
)
def test_parse_refuses_non_blocks(data: bytes) -> None:
    with pytest.raises(grubenv.GrubEnvError, match="grub-editenv FILE create"):
        grubenv.parse(data)


def test_parse_refuses_huge_block() -> None:
    with pytest.raises(grubenv.GrubEnvError, match="not sane"):
        grubenv.parse(block(b"a=1\n", size=grubenv.GRUBENV_MAX_SIZE + 1))


def test_read_error_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "grubenv"
    path.write_bytes(b"hello\n")
    with pytest.raises(grubenv.GrubEnvError, match=str(path)):
        grubenv.read(str(path))
    with pytest.raises(FileNotFoundError):
        grubenv.read(str(tmp_path / "missing"))


# --- what grub reads from unusual blocks --------------------------------------------------------

# (block body, what GRUB sees). Each case is checked against `grub-editenv list` below.
GRUB_READS = [
    (b"a=1\n# c=3\nb=2\n", {"a": "1", "b": "2"}),
    (b"a=1\n# comment \\\nd=3\nb=2\n", {"a": "1", "b": "2"}),  # an escaped newline continues a comment
    (b"a=1\n####\nb=2\n", {"a": "1", "b": "2"}),
    (b"a=\\x\\#\\=y\\\\\n", {"a": "x#=y\\"}),  # a backslash makes any byte literal
    (b"a=1\n\nb=2\n", {"a": "1", "\nb": "2"}),  # a blank line becomes part of the next name
    (b"a=1\nbroken\n", {"a": "1"}),  # no '=' up to the end: ignored
    (b"a=1\r\n", {"a": "1\r"}),
    (b" a=1\n", {" a": "1"}),
    (b"a\0b=1\nc=2\n", {"a": "1", "c": "2"}),  # C strings
    (b"a=1\0x\nc=2\n", {"a": "1", "c": "2"}),
]


@pytest.mark.parametrize(("body", "expected"), GRUB_READS)
def test_parse_grub_quirks(body: bytes, expected: dict[str, str]) -> None:
    assert grubenv.parse(block(body)) == expected


@needs_editenv
@pytest.mark.parametrize(("body", "expected"), GRUB_READS)
def test_grub_quirks_match_grub_editenv_list(tmp_path: Path, body: bytes, expected: dict[str, str]) -> None:
    path = tmp_path / "grubenv"
    path.write_bytes(block(body))
    assert editenv_ok(path, "list") == raw(grubenv.render_list(expected))


def test_parse_ignores_unterminated_tail() -> None:
    assert grubenv.parse(grubenv.GRUBENV_HEADER + b"a=1\nb=2") == {"a": "1"}
    assert grubenv.parse(grubenv.GRUBENV_HEADER + b"a=1\nb=x\\") == {"a": "1"}
    assert grubenv.parse(block(b"a=1\n", pad=b"\0")) == {"a": "1"}
    assert grubenv.parse(block(b"a=1\n", size=40)) == {"a": "1"}


def test_parse_duplicate_later_value_wins() -> None:
    # GRUB's load_env applies each line in turn, so at boot the later value is the one in effect.
    assert grubenv.parse(block(b"a=1\nb=2\na=3\n")) == {"a": "3", "b": "2"}


# --- compatibility with grub-editenv --------------------------------------------------------------


@needs_editenv
def test_encode_empty_equals_create(tmp_path: Path) -> None:
    path = tmp_path / "grubenv"
    editenv_ok(path, "create")
    assert path.read_bytes() == grubenv.encode({})


@needs_editenv
def test_set_on_missing_file_creates_the_same_block(tmp_path: Path) -> None:
    path = tmp_path / "grubenv"
    editenv_ok(path, "set", "kubeos_default=A")
    assert path.read_bytes() == grubenv.encode({"kubeos_default": "A"})


@needs_editenv
def test_write_atomic_is_listed_right_by_grub_editenv(tmp_path: Path) -> None:
    path = tmp_path / "grubenv"
    env = {"kubeos_default": "A", "kubeos_trial": "", "kubeos_tries": "3", **ODD_VALUES}
    grubenv.write_atomic(str(path), env)
    assert editenv_ok(path, "list") == raw(grubenv.render_list(env))
    # and grub-editenv can go on editing it
    editenv_ok(path, "set", "kubeos_tries=2")
    assert grubenv.read(str(path)) == grubenv.update(env, {"kubeos_tries": "2"})


@needs_editenv
@pytest.mark.parametrize("name", sorted(ODD_VALUES))
def test_grub_editenv_set_is_read_right(tmp_path: Path, name: str) -> None:
    path = tmp_path / "grubenv"
    value = ODD_VALUES[name]
    editenv_ok(path, "create")
    editenv_ok(path, "set", "first=1", f"{name}={value}", "last=2")
    expected = {"first": "1", name: value, "last": "2"}
    assert grubenv.read(str(path)) == expected
    assert path.read_bytes() == grubenv.encode(expected)
    assert editenv_ok(path, "list") == raw(grubenv.render_list(expected))


@needs_editenv
def test_grub_editenv_non_utf8_value_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "grubenv"
    editenv_ok(path, "set", b"v=caf\xe9\n\\")
    env = grubenv.read(str(path))
    assert raw(env["v"]) == b"caf\xe9\n\\"
    assert grubenv.encode(env) == path.read_bytes()


@needs_editenv
def test_sets_and_unsets_byte_for_byte(tmp_path: Path) -> None:
    path = tmp_path / "grubenv"
    editenv_ok(path, "create")
    expected: dict[str, str] = {}
    steps: list[tuple[str, str | None]] = [
        ("kubeos_default", "A"),
        ("kubeos_trial", "B"),
        ("kubeos_tries", "3"),
        ("kubeos_tries", "2"),
        ("odd", "x\\y\nz"),
        ("kubeos_trial", None),
        ("kubeos_default", "B-with-a-longer-value"),
        ("kubeos_trial", ""),
        ("odd", "short"),
        ("never_set", None),
    ]
    for name, value in steps:
        if value is None:
            editenv_ok(path, "unset", name)
        else:
            editenv_ok(path, "set", f"{name}={value}")
        expected = grubenv.update(expected, {name: value})
        assert path.read_bytes() == grubenv.encode(expected), (name, value)
        assert grubenv.read(str(path)) == expected


@needs_editenv
def test_random_edits_byte_for_byte(tmp_path: Path) -> None:
    rng = random.Random(20240611)
    path = tmp_path / "grubenv"
    editenv_ok(path, "create")
    names = ["a", "kubeos_default", "kubeos_trial", "kubeos_tries", "x\\y", "unicode_ü", "n"]
    values = [*ODD_VALUES.values(), "A", "B", "0", "9" * 40]
    expected: dict[str, str] = {}
    for _ in range(120):
        name = rng.choice(names)
        if rng.random() < 0.3:
            editenv_ok(path, "unset", name)
            expected = grubenv.update(expected, {name: None})
        else:
            value = rng.choice(values)
            editenv_ok(path, "set", f"{name}={value}")
            expected = grubenv.update(expected, {name: value})
        assert path.read_bytes() == grubenv.encode(expected)
    assert grubenv.read(str(path)) == expected


@needs_editenv
def test_overflow_boundary_matches_grub_editenv(tmp_path: Path) -> None:
    room = 1024 - len(grubenv.GRUBENV_HEADER) - len(grubenv.GRUBENV_MESSAGE)
    fits, too_long = "x" * (room - 3), "x" * (room - 2)
    path = tmp_path / "grubenv"
    editenv_ok(path, "create")
    editenv_ok(path, "set", f"v={fits}")
    assert path.read_bytes() == grubenv.encode({"v": fits})
    editenv_ok(path, "create")
    assert editenv(path, "set", f"v={too_long}").returncode != 0
    with pytest.raises(grubenv.GrubEnvError, match=r"\b1 byte over"):
        grubenv.encode({"v": too_long})


# --- write_atomic ---------------------------------------------------------------------------------


def test_write_atomic_new_file_default_mode(tmp_path: Path) -> None:
    path = tmp_path / "grubenv"
    old_umask = os.umask(0o077)
    try:
        grubenv.write_atomic(str(path), {"a": "1"})
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert path.read_bytes() == grubenv.encode({"a": "1"})
    assert os.listdir(tmp_path) == ["grubenv"]


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o444])
def test_write_atomic_keeps_mode(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "grubenv"
    path.write_bytes(grubenv.encode({"a": "1"}))
    path.chmod(mode)
    grubenv.write_atomic(str(path), {"a": "2"})
    assert stat.S_IMODE(path.stat().st_mode) == mode
    assert grubenv.read(str(path)) == {"a": "2"}
    assert os.listdir(tmp_path) == ["grubenv"]


@pytest.mark.skipif(os.geteuid() != 0, reason="changing owners needs root")
def test_write_atomic_keeps_owner(tmp_path: Path) -> None:
    path = tmp_path / "grubenv"
    path.write_bytes(grubenv.encode({}))
    os.chown(path, 4321, 4322)
    grubenv.write_atomic(str(path), {"a": "1"})
    info = path.stat()
    assert (info.st_uid, info.st_gid) == (4321, 4322)


def test_write_atomic_replaces_the_inode(tmp_path: Path) -> None:
    path = tmp_path / "grubenv"
    grubenv.write_atomic(str(path), {"a": "1"})
    before = path.stat().st_ino
    grubenv.write_atomic(str(path), {"a": "2"})
    assert path.stat().st_ino != before


def test_write_atomic_overflow_leaves_old_file(tmp_path: Path) -> None:
    path = tmp_path / "grubenv"
    grubenv.write_atomic(str(path), {"kubeos_default": "A"})
    path.chmod(0o600)
    old = path.read_bytes()
    with pytest.raises(grubenv.GrubEnvError, match="bytes over"):
        grubenv.write_atomic(str(path), {"kubeos_default": "x" * 2000})
    with pytest.raises(grubenv.GrubEnvError, match="contains '='"):
        grubenv.write_atomic(str(path), {"bad=name": "x"})
    assert path.read_bytes() == old
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert os.listdir(tmp_path) == ["grubenv"]


def test_write_atomic_io_failure_cleans_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "grubenv"
    grubenv.write_atomic(str(path), {"kubeos_default": "A"})
    old = path.read_bytes()

    def broken_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="No space left"):
        grubenv.write_atomic(str(path), {"kubeos_default": "B"})
    assert path.read_bytes() == old
    assert os.listdir(tmp_path) == ["grubenv"]


def test_write_atomic_follows_symlink(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "grubenv"
    grubenv.write_atomic(str(target), {"a": "1"})
    link = tmp_path / "grubenv"
    link.symlink_to(target)
    grubenv.write_atomic(str(link), {"a": "2"})
    assert link.is_symlink()
    assert grubenv.read(str(target)) == {"a": "2"}
    assert sorted(os.listdir(tmp_path / "real")) == ["grubenv"]


def test_write_atomic_keeps_block_size(tmp_path: Path) -> None:
    path = tmp_path / "grubenv"
    path.write_bytes(grubenv.encode({"a": "1"}, 2048))
    grubenv.write_atomic(str(path), {"a": "2"})
    assert path.read_bytes() == grubenv.encode({"a": "2"}, 2048)
    path.write_bytes(b"garbage")  # not a block: replaced by a standard one
    grubenv.write_atomic(str(path), {"a": "3"})
    assert path.read_bytes() == grubenv.encode({"a": "3"})


def test_write_atomic_refuses_directory(tmp_path: Path) -> None:
    (tmp_path / "grubenv").mkdir()
    with pytest.raises(grubenv.GrubEnvError, match="not a regular file"):
        grubenv.write_atomic(str(tmp_path / "grubenv"), {"a": "1"})
    assert os.listdir(tmp_path) == ["grubenv"]


# --- runs on managed nodes ------------------------------------------------------------------------


def test_source_is_python39_syntax() -> None:
    source = Path(grubenv.__file__).read_text(encoding="utf-8")
    tree = ast.parse(source, feature_version=(3, 9))
    imports = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")])
    }
    # Runs on managed hosts: the standard library and the collection's own module_utils, nothing else.
    own = "ansible_collections.kubeos.os.plugins.module_utils"
    assert {name for name in imports if name.split(".")[0] not in sys.stdlib_module_names} == {own}
    first_code = next(node for node in tree.body if not isinstance(node, ast.Expr))
    assert isinstance(first_code, ast.ImportFrom) and first_code.module == "__future__"
