"""pam.limits: key = domain, value = type.item.value, in limits.conf."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sysconfig_tree import configure, contents, fingerprint, put, read

from ansible_collections.kubeos.os.plugins.module_utils.sysconfig import models

PATH = "/etc/security/limits.conf"
LIMITS = """\
# /etc/security/limits.conf
#<domain>      <type>  <item>         <value>
#*               soft    core            0
*               soft    nofile          1024
*               hard    nofile          4096
@student        hard    nproc           20
"""


def limits(*items: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"model": "pam.limits", "contents": list(items)}]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    put(root, PATH, LIMITS)
    return root


def test_update_changes_one_line_keeping_its_columns(root: Path) -> None:
    result = configure(root, limits({"key": "*", "value": "soft.nofile.65535"}))
    assert read(root, PATH) == LIMITS.replace("nofile          1024", "nofile          65535")
    assert contents(result) == [
        {"key": "*", "operation": "set", "before": "soft.nofile.1024", "after": "soft.nofile.65535", "changed": True}
    ]


def test_add_aligns_the_new_line_like_the_last_entry(root: Path) -> None:
    configure(root, limits({"key": "@dev", "value": "-.memlock.unlimited"}))
    assert read(root, PATH) == LIMITS + "@dev            -       memlock         unlimited\n"


def test_underscore_keeps_the_lines_part_and_must_match_one_line(root: Path) -> None:
    configure(root, limits({"key": "@student", "value": "_._.30"}))
    assert "@student        hard    nproc           30\n" in read(root, PATH)
    before = fingerprint(root)
    with pytest.raises(models.SysconfigError, match="must match exactly one line of domain '\\*' but matches 2"):
        configure(root, limits({"key": "@student", "value": "_._.40"}, {"key": "*", "value": "_.nofile.1"}))
    assert fingerprint(root) == before


def test_delete_one_setting_or_the_whole_domain(root: Path) -> None:
    configure(root, limits({"key": "*", "value": "hard.nofile", "operation": "delete"}))
    assert "hard    nofile" not in read(root, PATH) and "soft    nofile" in read(root, PATH)
    kept = configure(root, limits({"key": "*", "value": "soft.nofile.99", "operation": "delete"}))
    assert not kept.changed and contents(kept)[0]["note"] == "no such line"
    configure(root, limits({"key": "@student", "operation": "delete"}))
    assert "@student" not in read(root, PATH)
    assert read(root, PATH).startswith("# /etc/security/limits.conf\n#<domain>")


def test_idempotent(root: Path) -> None:
    configs = limits({"key": "*", "value": "soft.nofile.65535"}, {"key": "root", "value": "hard.core.0"})
    configure(root, configs)
    after = fingerprint(root)
    again = configure(root, configs)
    assert not again.changed and fingerprint(root) == after


def test_lines_of_another_domain_or_item_are_not_touched(root: Path) -> None:
    configure(root, limits({"key": "*", "value": "hard.nproc.100"}))
    text = read(root, PATH)
    assert "@student        hard    nproc           20\n" in text
    assert text.endswith("*               hard    nproc           100\n")
