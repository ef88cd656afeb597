"""kernel.sysctl (the running kernel under <root>/proc/sys) and kernel.sysctl.persist (sysctl.conf lines)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from sysconfig_tree import configure, contents, fingerprint, put, read

from ansible_collections.kubeos.os.plugins.module_utils.sysconfig import models

CONF = (
    "# /etc/sysctl.conf - kernel settings applied at boot\n"
    ";  an old-style comment\n"
    "\n"
    "net.ipv4.ip_forward=0\n"
    "vm.swappiness = 60   \n"
    "kernel/pid_max = 4096\n"
    "-net.ipv6.conf.all.disable_ipv6 = 1\n"
)


def persist(*items: dict[str, Any], configpath: str = "") -> list[dict[str, Any]]:
    return [{"model": "kernel.sysctl.persist", "configpath": configpath, "contents": list(items)}]


def runtime(*items: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"model": "kernel.sysctl", "contents": list(items)}]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    put(root, "/etc/sysctl.conf", CONF)
    (root / "etc/sysctl.d").mkdir()
    put(root, "/proc/sys/net/ipv4/ip_forward", "0\n")
    put(root, "/proc/sys/net/ipv4/ip_local_port_range", "32768\t60999\n")
    put(root, "/proc/sys/net/ipv4/conf/eth0.100/rp_filter", "1\n")
    return root


# --- kernel.sysctl ------------------------------------------------------------------------------


def test_runtime_value_is_written_and_reported_with_what_it_replaced(root: Path) -> None:
    result = configure(root, runtime({"key": "net.ipv4.ip_forward", "value": 1}))
    assert read(root, "/proc/sys/net/ipv4/ip_forward") == "1\n"
    assert contents(result) == [
        {"key": "net.ipv4.ip_forward", "operation": "set", "before": "0", "after": "1", "changed": True}
    ]
    assert not configure(root, runtime({"key": "net.ipv4.ip_forward", "value": "1"})).changed


def test_runtime_multi_word_values_compare_word_by_word(root: Path) -> None:
    same = configure(root, runtime({"key": "net.ipv4.ip_local_port_range", "value": [32768, 60999]}))
    assert not same.changed
    configure(root, runtime({"key": "net/ipv4/ip_local_port_range", "value": "1024 65000"}))
    assert read(root, "/proc/sys/net/ipv4/ip_local_port_range") == "1024 65000\n"


def test_runtime_slash_in_a_dotted_key_is_a_dot_in_the_name(root: Path) -> None:
    configure(root, runtime({"key": "net.ipv4.conf.eth0/100.rp_filter", "value": 2}))
    assert read(root, "/proc/sys/net/ipv4/conf/eth0.100/rp_filter") == "2\n"


def test_runtime_key_that_the_kernel_does_not_have_is_refused(root: Path) -> None:
    before = fingerprint(root)
    with pytest.raises(models.SysconfigError, match=r"configs\[0\]\.contents\[1\].*does not exist on this node"):
        configure(root, runtime({"key": "net.ipv4.ip_forward", "value": 1}, {"key": "net.ipv4.tcp_nope", "value": 1}))
    assert fingerprint(root) == before


def test_runtime_same_key_twice_the_last_wins(root: Path) -> None:
    result = configure(
        root, runtime({"key": "net.ipv4.ip_forward", "value": 1}, {"key": "net.ipv4.ip_forward", "value": 0})
    )
    assert read(root, "/proc/sys/net/ipv4/ip_forward") == "0\n"
    assert not result.changed  # 0 → 1 → 0: nothing to write


# --- kernel.sysctl.persist ----------------------------------------------------------------------


def test_persist_update_add_and_delete_keep_every_other_line(root: Path) -> None:
    result = configure(
        root,
        persist(
            {"key": "vm.swappiness", "value": 10},
            {"key": "net.core.somaxconn", "value": 4096},
            {"key": "net.ipv4.ip_forward", "operation": "delete"},
        ),
    )
    assert read(root, "/etc/sysctl.conf") == (
        "# /etc/sysctl.conf - kernel settings applied at boot\n"
        ";  an old-style comment\n"
        "\n"
        "vm.swappiness = 10   \n"
        "kernel/pid_max = 4096\n"
        "-net.ipv6.conf.all.disable_ipv6 = 1\n"
        "net.core.somaxconn = 4096\n"
    )
    assert contents(result) == [
        {"key": "vm.swappiness", "operation": "set", "before": "60", "after": "10", "changed": True},
        {"key": "net.core.somaxconn", "operation": "set", "before": None, "after": "4096", "changed": True},
        {"key": "net.ipv4.ip_forward", "operation": "delete", "before": "0", "after": None, "changed": True},
    ]


def test_persist_is_idempotent(root: Path) -> None:
    configs = persist(
        {"key": "vm.swappiness", "value": 10}, {"key": "a.b", "value": [1, 2]}, {"key": "c.d", "operation": "delete"}
    )
    configure(root, configs)
    text = read(root, "/etc/sysctl.conf")
    again = configure(root, configs)
    assert not again.changed and read(root, "/etc/sysctl.conf") == text
    assert [c["changed"] for c in contents(again)] == [False, False, False]


def test_persist_matches_both_spellings_and_the_ignore_errors_prefix(root: Path) -> None:
    configure(
        root, persist({"key": "kernel.pid_max", "value": 65536}, {"key": "net/ipv6/conf/all/disable_ipv6", "value": 0})
    )
    text = read(root, "/etc/sysctl.conf")
    assert "kernel/pid_max = 65536\n" in text and "-net.ipv6.conf.all.disable_ipv6 = 0\n" in text
    assert "kernel.pid_max" not in text


def test_persist_updates_every_line_of_a_repeated_key(root: Path) -> None:
    put(root, "/etc/sysctl.conf", "vm.swappiness = 60\nx.y = 1\nvm.swappiness=30\n")
    result = configure(root, persist({"key": "vm.swappiness", "value": 5}))
    assert read(root, "/etc/sysctl.conf") == "vm.swappiness = 5\nx.y = 1\nvm.swappiness=5\n"
    assert contents(result)[0]["before"] == "30"  # the one sysctl applied last


def test_persist_delete_with_a_value_only_removes_that_value(root: Path) -> None:
    result = configure(root, persist({"key": "vm.swappiness", "value": 30, "operation": "delete"}))
    assert not result.changed and "vm.swappiness = 60" in read(root, "/etc/sysctl.conf")
    assert "kept: the file holds '60', not '30'" in contents(result)[0]["note"]
    configure(root, persist({"key": "vm.swappiness", "value": 60, "operation": "delete"}))
    assert "swappiness" not in read(root, "/etc/sysctl.conf")


def test_persist_delete_of_a_missing_key_changes_nothing(root: Path) -> None:
    result = configure(root, persist({"key": "no.such.key", "operation": "delete"}))
    assert not result.changed and contents(result)[0]["note"] == "not in the file"


def test_persist_creates_a_missing_file_0644_and_a_delete_alone_does_not(root: Path) -> None:
    configure(root, persist({"key": "a.b", "operation": "delete"}, configpath="/etc/sysctl.d/90-x.conf"))
    assert not (root / "etc/sysctl.d/90-x.conf").exists()
    configure(root, persist({"key": "a.b", "value": "x"}, configpath="/etc/sysctl.d/90-x.conf"))
    path = root / "etc/sysctl.d/90-x.conf"
    assert path.read_text() == "a.b = x\n" and path.stat().st_mode & 0o777 == 0o644


def test_persist_keeps_mode_and_adds_a_missing_final_newline(root: Path) -> None:
    put(root, "/etc/sysctl.conf", "# no final newline\nx.y = 1", mode=0o600)
    configure(root, persist({"key": "a.b", "value": 2}))
    assert read(root, "/etc/sysctl.conf") == "# no final newline\nx.y = 1\na.b = 2\n"
    assert os.stat(root / "etc/sysctl.conf").st_mode & 0o777 == 0o600
