"""The kubeos.os collection as users get it: built with ansible-galaxy, installed, documented and run.

Everything here runs against the *installed* copy only (ANSIBLE_COLLECTIONS_PATH names nothing else), so a
file the build leaves out, a broken import between module_utils, or a doc block ansible-doc cannot parse fails
here even when the tests that run from the source tree pass.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO, loop_devices_of
from support.osimage import make_os_tree, make_tar

COLLECTION_SRC = REPO / "collections" / "ansible_collections" / "kubeos" / "os"
BIN = Path(sys.executable).parent
MODULES = ("disk_layout", "slot_info", "boot_slot", "slot_write")
VERSIONS = {"A": "1", "B": "2"}  # the OS version written into each slot


def _ansible_env(collections_path: Path) -> dict[str, str]:
    """This process's environment without ANSIBLE_* or PYTHONPATH, then only the installed collections."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("ANSIBLE_") and key != "PYTHONPATH"}
    env.update(
        {
            "ANSIBLE_COLLECTIONS_PATH": str(collections_path),
            "ANSIBLE_COLLECTIONS_SCAN_SYS_PATH": "False",
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_RETRY_FILES_ENABLED": "False",
            "ANSIBLE_LOCALHOST_WARNING": "False",
            "ANSIBLE_INVENTORY_UNPARSED_WARNING": "False",
            "ANSIBLE_GALAXY_DISABLE_GPG_VERIFY": "True",
        }
    )
    return env


def _run(argv: list[str], *, env: dict[str, str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout, check=False)
    assert res.returncode == 0, f"{' '.join(argv)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
    return res


def _source_files(subdir: str) -> set[str]:
    root = COLLECTION_SRC / subdir
    return {
        str(path.relative_to(COLLECTION_SRC))
        for path in root.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    }


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build the collection into a temporary directory and install the artifact; returns the collections path."""
    work = tmp_path_factory.mktemp("galaxy")
    env = _ansible_env(work / "collections")
    build_dir = work / "build"
    build_dir.mkdir()
    _run(
        [str(BIN / "ansible-galaxy"), "collection", "build", str(COLLECTION_SRC), "--output-path", str(build_dir)],
        env=env,
        cwd=work,
    )
    galaxy = yaml.safe_load((COLLECTION_SRC / "galaxy.yml").read_text())
    artifact = build_dir / f"{galaxy['namespace']}-{galaxy['name']}-{galaxy['version']}.tar.gz"
    assert artifact.is_file(), f"no artifact {artifact.name}; built: {sorted(p.name for p in build_dir.iterdir())}"
    _run(
        [str(BIN / "ansible-galaxy"), "collection", "install", "-p", str(work / "collections"), str(artifact)],
        env=env,
        cwd=work,
    )
    return work / "collections"


def test_root_galaxy_yml_is_a_relative_link_to_the_collections() -> None:
    root_galaxy = REPO / "galaxy.yml"
    coll_galaxy = COLLECTION_SRC / "galaxy.yml"
    assert root_galaxy.is_symlink(), "galaxy.yml at the repository root should be a link"
    assert not os.path.isabs(os.readlink(root_galaxy)), "the root galaxy.yml link should be relative"
    assert not coll_galaxy.is_symlink(), "the collection's galaxy.yml should be the real file"
    assert root_galaxy.resolve() == coll_galaxy.resolve()
    meta = yaml.safe_load(root_galaxy.read_text())
    assert (meta["namespace"], meta["name"]) == ("kubeos", "os")


def test_installed_tree_is_complete(installed: Path) -> None:
    root = installed / "ansible_collections" / "kubeos" / "os"
    for name in MODULES:
        assert (root / "plugins" / "modules" / f"{name}.py").is_file(), f"module {name} not installed"
    assert (root / "meta" / "runtime.yml").is_file()
    assert (root / "MANIFEST.json").is_file()
    assert (root / "roles" / "provision" / "tasks" / "main.yml").is_file()
    assert (root / "roles" / "provision" / "meta" / "argument_specs.yml").is_file()
    # Every plugin and every file of the provision role the source has (module_utils included) was packaged.
    for subdir in ("plugins/modules", "plugins/module_utils", "roles/provision"):
        wanted = _source_files(subdir)
        assert wanted, f"nothing under {subdir} in the source tree"
        missing = sorted(rel for rel in wanted if not (root / rel).is_file())
        assert not missing, f"not installed: {missing}"
    # Nothing of a developer's tree got packaged: bytecode, test output, earlier build artifacts.
    junk = sorted(
        str(path.relative_to(root))
        for path in root.rglob("*")
        if path.name == "__pycache__" or path.suffix == ".pyc" or path.name.endswith(".tar.gz")
    )
    assert not junk, f"packaged by mistake: {junk}"
    assert not (root / "tests" / "output").exists()
    manifest = json.loads((root / "MANIFEST.json").read_text())
    assert manifest["collection_info"]["namespace"] == "kubeos"
    assert manifest["collection_info"]["name"] == "os"


@pytest.mark.parametrize("name", MODULES)
def test_ansible_doc_of_installed_module(installed: Path, name: str, tmp_path: Path) -> None:
    env = _ansible_env(installed)
    fqcn = f"kubeos.os.{name}"
    text = _run([str(BIN / "ansible-doc"), "-t", "module", fqcn], env=env, cwd=tmp_path).stdout
    assert fqcn in text
    assert "EXAMPLES" in text and "RETURN VALUES" in text, text
    doc = json.loads(_run([str(BIN / "ansible-doc"), "--json", "-t", "module", fqcn], env=env, cwd=tmp_path).stdout)
    entry = doc[fqcn]
    assert entry["doc"]["module"] == name
    # The documentation came from the installed copy, not from the repository.
    assert Path(entry["doc"]["filename"]).resolve().is_relative_to(installed.resolve())
    assert entry["examples"] and entry["return"]


def _playbook(image: Path, tars: dict[str, tuple[Path, str]], facts_out: Path) -> list[dict[str, Any]]:
    def write(slot: str) -> dict[str, Any]:
        tar, sha = tars[slot]
        return {
            "name": f"Write version {VERSIONS[slot]} into slot {slot}",
            "kubeos.os.slot_write": {
                "device": str(image),
                "slot": slot,
                "src": f"file://{tar}",
                "sha256": sha,
                "format": "tar",
            },
            "register": f"write_{slot.lower()}",
        }

    tasks: list[dict[str, Any]] = [
        {
            "name": "Lay the image out",
            "kubeos.os.disk_layout": {"device": str(image), "root_size": "256MiB"},
            "register": "layout",
        },
        write("A"),
        {
            "name": "Commit slot A",
            "kubeos.os.boot_slot": {"device": str(image), "state": "committed", "slot": "A"},
            "register": "commit",
        },
        write("B"),
        {
            "name": "Try the inactive slot",
            "kubeos.os.boot_slot": {"device": str(image), "state": "trial", "tries": 2},
            "register": "trial",
        },
        {"name": "Read the slots", "kubeos.os.slot_info": {"device": str(image)}, "register": "info"},
        {
            "name": "Keep what the modules returned for the test",
            "ansible.builtin.copy": {
                "dest": str(facts_out),
                "mode": "0644",
                "content": (
                    "{{ {'layout': layout, 'write_a': write_a, 'commit': commit, 'write_b': write_b,"
                    " 'trial': trial, 'info': info, 'fact': kubeos} | to_nice_json }}"
                ),
            },
        },
        {
            "name": "Slot B is on trial, slot A stays the default",
            "ansible.builtin.assert": {
                "that": [
                    "kubeos.layout == 'kubeos'",
                    "kubeos.grub.trial == 'B'",
                    "kubeos.grub.default == 'A'",
                    f"kubeos.slots.A.version == '{VERSIONS['A']}'",
                    f"kubeos.slots.B.version == '{VERSIONS['B']}'",
                ]
            },
        },
    ]
    return [{"name": "Every kubeos.os module by its FQCN", "hosts": "all", "gather_facts": False, "tasks": tasks}]


@pytest.mark.loop
def test_installed_modules_drive_an_image(installed: Path, image_file: Callable[..., Path], tmp_path: Path) -> None:
    image = image_file("disk.img", size_mib=1024)
    tars: dict[str, tuple[Path, str]] = {}
    for slot in ("A", "B"):
        tree = make_os_tree(tmp_path / f"tree-{slot}", VERSIONS[slot])
        tar = tmp_path / f"rootfs-{slot}.tar"
        tars[slot] = (tar, make_tar(tree, tar))

    facts_out = tmp_path / "facts.json"
    playbook = tmp_path / "play.yml"
    playbook.write_text(yaml.safe_dump(_playbook(image, tars, facts_out), sort_keys=False))
    inventory = tmp_path / "inventory.yml"
    host = {"ansible_connection": "local", "ansible_python_interpreter": "{{ ansible_playbook_python }}"}
    inventory.write_text(yaml.safe_dump({"all": {"hosts": {"localhost": host}}}))

    _run(
        [str(BIN / "ansible-playbook"), "-i", str(inventory), str(playbook)],
        env=_ansible_env(installed),
        cwd=tmp_path,
        timeout=600,
    )

    got = json.loads(facts_out.read_text())
    assert got["layout"]["changed"]
    assert [p["partlabel"] for p in got["layout"]["partitions"]] == ["ESP", "BOOT", "ROOT-A", "ROOT-B", "PERSIST"]
    assert got["write_a"]["changed"] and got["write_a"]["slot"] == "A"
    assert got["write_a"]["sha256"] == tars["A"][1] and got["write_a"]["version"] == VERSIONS["A"]
    assert got["write_b"]["changed"] and got["write_b"]["slot"] == "B"
    assert got["write_b"]["sha256"] == tars["B"][1] and got["write_b"]["version"] == VERSIONS["B"]
    assert got["trial"]["changed"] and got["trial"]["slot"] == "B"

    info = got["info"]["kubeos"]
    assert not got["info"]["changed"]
    assert info == got["fact"], "slot_info should set the kubeos fact to what it returns"
    assert info["layout"] == "kubeos"
    assert info["grub"]["trial"] == "B"
    assert info["grub"]["default"] == "A"
    assert str(info["grub"]["tries"]) == "2"
    assert info["slots"]["A"]["bootable"] and info["slots"]["A"]["version"] == VERSIONS["A"]
    assert info["slots"]["B"]["bootable"] and info["slots"]["B"]["version"] == VERSIONS["B"]
    # The modules attach a loop device over an image file themselves and detach it again.
    assert loop_devices_of(image) == []
