"""Pure logic of the disk layout, the GRUB menu, slot recognition and boot control.

No disks here: synthetic partition tables and disk states, small trees under tmp_path, and the
real ``grub-script-check`` for the rendered menu.
"""

from __future__ import annotations

import os
import shutil
import string
import subprocess
from pathlib import Path

import pytest

from ansible_collections.kubeos.os.plugins.module_utils import blockdev, bootcontrol, grubcfg, layout, slots

MIB = 1024 * 1024
GRUB_SCRIPT_CHECK = shutil.which("grub-script-check")
needs_script_check = pytest.mark.skipif(GRUB_SCRIPT_CHECK is None, reason="grub-script-check (grub-common) is missing")

PARTUUID_A = "3f0c1b6e-5d1a-4c5e-9a51-0a1b2c3d4e5f"
PARTUUID_B = "9a1d2e3f-4b5c-4d6e-8f70-1a2b3c4d5e6f"


# --- parse_size ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("64MiB", 64 * MIB),
        ("64M", 64 * MIB),
        ("64mib", 64 * MIB),
        (" 64 MiB ", 64 * MIB),
        ("512MB", 512 * MIB),
        ("2G", 2048 * MIB),
        ("2GiB", 2048 * MIB),
        ("1.5GiB", 1536 * MIB),
        ("1T", 1024 * 1024 * MIB),
        ("4k", 4096),
        ("4096", 4096),
        (4096, 4096),
        (64 * MIB, 64 * MIB),
    ],
)
def test_parse_size_reads_binary_units(text: object, expected: int) -> None:
    assert layout.parse_size(text, "root_size") == expected


@pytest.mark.parametrize("text", ["", "MiB", "abc", "-1M", "64 XB", "1.2.3M", "64MiBs", "1e3", "0x10", "64 M iB", None])
def test_parse_size_refuses_what_it_cannot_read_and_names_the_option(text: object) -> None:
    with pytest.raises(layout.LayoutError, match=r"^persist_size: cannot read the size .*64MiB"):
        layout.parse_size(text, "persist_size")


# --- LayoutSpec.validate and sfdisk_script ------------------------------------------------------


def _needed_mib(spec: layout.LayoutSpec) -> int:
    """What the layout really occupies: 1 MiB in front, the partitions, 1 MiB for the backup GPT."""
    parts = (1 if spec.bios_boot else 0) + (spec.esp_size + spec.boot_size + 2 * spec.root_size) // MIB
    return 1 + parts + (spec.persist_size // MIB if spec.persist_size else 16) + 1


@pytest.mark.parametrize(
    "spec",
    [
        layout.LayoutSpec(),
        layout.LayoutSpec(root_size=64 * MIB),
        layout.LayoutSpec(root_size=64 * MIB, bios_boot=True),
        layout.LayoutSpec(root_size=64 * MIB, persist_size=32 * MIB),
        layout.LayoutSpec(root_size=256 * MIB, persist_size=100 * MIB, bios_boot=True),
    ],
    ids=["defaults", "small-slots", "bios", "persist-size", "bios-and-persist-size"],
)
def test_validate_accepts_a_disk_exactly_big_enough_and_refuses_one_mib_less(spec: layout.LayoutSpec) -> None:
    needed = _needed_mib(spec)
    spec.validate(needed * MIB)
    with pytest.raises(layout.LayoutError, match=r"needs \d+ MiB but the disk has \d+ MiB; use a bigger disk"):
        spec.validate((needed - 1) * MIB)


def test_validate_refuses_a_too_small_disk_saying_how_much_is_needed() -> None:
    spec = layout.LayoutSpec()  # 64 + 64 + 2 x 2048 + 16 (PERSIST) + 2 = 4242 MiB
    with pytest.raises(layout.LayoutError) as err:
        spec.validate(1024 * MIB)
    assert "needs 4242 MiB but the disk has 1024 MiB" in str(err.value)
    assert "root_size is counted twice" in str(err.value)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("esp_size", 64 * MIB + 512, "esp_size must be a whole number of MiB"),
        ("boot_size", 64 * MIB - 4096, "boot_size must be a whole number of MiB"),
        ("root_size", int(1.3 * 1024 * MIB), "root_size must be a whole number of MiB"),
        ("persist_size", 100 * MIB + 1, "persist_size must be a whole number of MiB"),
        ("esp_size", 16 * MIB, "esp_size must be at least 32MiB"),
        ("boot_size", 8 * MIB, "boot_size must be at least 16MiB"),
        ("root_size", 32 * MIB, "root_size must be at least 64MiB"),
        ("persist_size", 8 * MIB, "at least 16MiB"),
    ],
)
def test_validate_refuses_sizes_that_are_not_whole_mib_or_too_small(field: str, value: int, message: str) -> None:
    spec = layout.LayoutSpec(**{field: value})
    with pytest.raises(layout.LayoutError, match=message):
        spec.validate(1024 * 1024 * MIB)


def _script_lines(spec: layout.LayoutSpec) -> list[dict[str, str]]:
    script = spec.sfdisk_script()
    assert script.endswith("\n")
    lines = script.splitlines()
    assert lines[:2] == ["label: gpt", "first-lba: 2048"]
    parsed = []
    for line in lines[2:]:
        fields = {}
        for item in line.split(","):
            key, _, value = item.strip().partition("=")
            fields[key] = value.strip('"')
        parsed.append(fields)
    return parsed


def test_sfdisk_script_lays_out_esp_boot_two_slots_and_persist_taking_the_rest() -> None:
    parts = _script_lines(layout.LayoutSpec(esp_size=64 * MIB, boot_size=32 * MIB, root_size=1024 * MIB))
    assert [p["name"] for p in parts] == ["ESP", "BOOT", "ROOT-A", "ROOT-B", "PERSIST"]
    assert [p["type"] for p in parts] == [layout.GPT_ESP] + [layout.GPT_LINUX] * 4
    assert [p.get("size") for p in parts] == [str(64 * 2048), str(32 * 2048), str(1024 * 2048), str(1024 * 2048), None]


def test_sfdisk_script_puts_a_one_mib_bios_partition_first_and_sizes_persist_when_asked() -> None:
    parts = _script_lines(layout.LayoutSpec(root_size=64 * MIB, persist_size=100 * MIB, bios_boot=True))
    assert [p["name"] for p in parts] == ["BIOS", "ESP", "BOOT", "ROOT-A", "ROOT-B", "PERSIST"]
    assert parts[0] == {"size": "2048", "type": layout.GPT_BIOS, "name": "BIOS"}
    assert parts[-1]["size"] == str(100 * 2048)


# --- grubcfg.render_menu -------------------------------------------------------------------------

ENTRIES = [grubcfg.SlotEntry("A", 3, PARTUUID_A), grubcfg.SlotEntry("B", 4, PARTUUID_B)]


def _script_check(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "grub.cfg"
    path.write_text(text)
    assert GRUB_SCRIPT_CHECK is not None
    return subprocess.run([GRUB_SCRIPT_CHECK, str(path)], capture_output=True, text=True, check=False)


@needs_script_check
@pytest.mark.parametrize("max_tries", range(1, grubcfg.MAX_TRIES + 1))
def test_menu_passes_grub_script_check_for_every_try_count(tmp_path: Path, max_tries: int) -> None:
    menu = grubcfg.render_menu(ENTRIES, kernel_args="console=ttyS0,115200 quiet", timeout=3, max_tries=max_tries)
    res = _script_check(tmp_path, menu)
    assert res.returncode == 0, res.stdout + res.stderr
    for n in range(1, max_tries + 1):
        assert f'elif [ "$kubeos_tries" = "{n}" ]; then\n    set kubeos_tries="{n - 1}"' in menu
    assert f'"$kubeos_tries" = "{max_tries + 1}"' not in menu


def test_menu_boots_each_slot_from_its_own_partition_by_partuuid() -> None:
    menu = grubcfg.render_menu(ENTRIES, kernel_args=" console=ttyS0 ", panic=7)
    for entry, other in ((ENTRIES[0], ENTRIES[1]), (ENTRIES[1], ENTRIES[0])):
        block = menu.split(f'menuentry "kubeos slot {entry.name}"', 1)[1].split("}\n", 1)[0]
        assert f'set root="($kubeos_disk,gpt{entry.number})"' in block
        assert (
            f"linux /boot/vmlinuz root=PARTUUID={entry.partuuid} ro kubeos.slot={entry.name} panic=7 "
            f"console=ttyS0 $kubeos_{entry.name}_cmdline"
        ) in block
        assert other.partuuid not in block
    assert 'load_env --file "$kubeos_env"' in menu
    assert "save_env --file" in menu


def test_menu_needs_exactly_slots_a_and_b() -> None:
    with pytest.raises(grubcfg.TemplateError, match="exactly the slots A and B"):
        grubcfg.render_menu([ENTRIES[0]])
    with pytest.raises(grubcfg.TemplateError, match="exactly the slots A and B"):
        grubcfg.render_menu([ENTRIES[0], grubcfg.SlotEntry("A", 4, PARTUUID_B)])


# Characters that end a GRUB word, start a substitution, a comment or a block: a kernel argument
# carrying one of them would break grub.cfg or change what it does (`#` would comment out the
# per-slot command line that follows).
BAD_KERNEL_ARG_CHARS = ['"', "'", "$", "\\", ";", "\n", "{", "}", "`", "|", "&", "<", ">", "#"]


@pytest.mark.parametrize("char", BAD_KERNEL_ARG_CHARS, ids=[repr(c) for c in BAD_KERNEL_ARG_CHARS])
def test_menu_refuses_kernel_args_that_grub_would_read_as_script(char: str) -> None:
    with pytest.raises(grubcfg.TemplateError, match="kernel_args must not contain"):
        grubcfg.render_menu(ENTRIES, kernel_args=f"console=ttyS0 quiet {char}x")


@needs_script_check
def test_menu_never_renders_kernel_args_that_grub_script_check_rejects(tmp_path: Path) -> None:
    rejected = []
    for char in string.punctuation + "\t":
        try:
            menu = grubcfg.render_menu(ENTRIES, kernel_args=f"quiet a{char}b {char}c")
        except grubcfg.TemplateError:
            continue
        res = _script_check(tmp_path, menu)
        if res.returncode != 0:
            rejected.append(char)
    assert rejected == [], f"render_menu accepted kernel_args that make grub.cfg invalid: {rejected}"


def test_esp_config_finds_boot_by_uuid_then_by_label() -> None:
    text = grubcfg.render_esp("0a1b2c3d-0000-4000-8000-000000000001", "BOOT")
    assert "search --no-floppy --fs-uuid --set=kubeos_bootfs 0a1b2c3d-0000-4000-8000-000000000001" in text
    assert "search --no-floppy --label --set=kubeos_bootfs BOOT" in text
    assert "configfile ($root)/grub/grub.cfg" in text


# --- slots.resolve_in_root ------------------------------------------------------------------------


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "usr/lib").mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "boot").mkdir()
    (root / "usr/lib/os-release").write_text("ID=inside\n")
    (root / "boot/vmlinuz-6.1").write_bytes(b"kernel")
    return root


def test_relative_symlink_resolves_inside_the_tree(tree: Path) -> None:
    os.symlink("../usr/lib/os-release", tree / "etc/os-release")
    assert slots.resolve_in_root(str(tree), "/etc/os-release") == str(tree / "usr/lib/os-release")


def test_absolute_symlink_resolves_inside_the_tree_not_on_the_host(tree: Path) -> None:
    os.symlink("/boot/vmlinuz-6.1", tree / "boot/vmlinuz")
    assert slots.resolve_in_root(str(tree), "/boot/vmlinuz") == str(tree / "boot/vmlinuz-6.1")
    # /etc/hostname exists on the host but not in the tree: the link must not lead out.
    os.symlink("/etc/hostname", tree / "etc/os-release")
    assert slots.resolve_in_root(str(tree), "/etc/os-release") is None
    os.symlink("/proc/self", tree / "etc/escape")
    assert slots.resolve_in_root(str(tree), "/etc/escape") is None


def test_symlinked_directories_in_the_middle_of_a_path_are_followed_inside(tree: Path) -> None:
    os.symlink("usr/lib", tree / "lib")
    os.symlink("/lib", tree / "boot/lib")
    assert slots.resolve_in_root(str(tree), "/lib/os-release") == str(tree / "usr/lib/os-release")
    assert slots.resolve_in_root(str(tree), "boot/lib/os-release") == str(tree / "usr/lib/os-release")


def test_dot_dot_above_the_root_stays_at_the_root(tree: Path) -> None:
    os.symlink("../../../../../../usr/lib/os-release", tree / "etc/os-release")
    assert slots.resolve_in_root(str(tree), "/etc/os-release") == str(tree / "usr/lib/os-release")
    assert slots.resolve_in_root(str(tree), "/../../usr/./lib/os-release") == str(tree / "usr/lib/os-release")
    os.symlink("../../../../etc/passwd", tree / "etc/passwd-link")
    assert slots.resolve_in_root(str(tree), "/etc/passwd-link") is None


def test_symlink_loops_and_dangling_links_resolve_to_nothing(tree: Path) -> None:
    os.symlink("b", tree / "etc/a")
    os.symlink("a", tree / "etc/b")
    os.symlink("/etc/self", tree / "etc/self")
    os.symlink("vmlinuz-missing", tree / "boot/vmlinuz")
    assert slots.resolve_in_root(str(tree), "/etc/a") is None
    assert slots.resolve_in_root(str(tree), "/etc/self") is None
    assert slots.resolve_in_root(str(tree), "/boot/vmlinuz") is None
    assert slots.resolve_in_root(str(tree), "/etc/missing") is None


def test_inspect_tree_reads_os_release_and_kernel_through_symlinks(tree: Path) -> None:
    (tree / "usr/lib/os-release").write_text('VERSION_ID="2.1"\nPRETTY_NAME="KubeOS 2.1"\n')
    os.symlink("../usr/lib/os-release", tree / "etc/os-release")
    os.symlink("/boot/vmlinuz-6.1", tree / "boot/vmlinuz")
    content = slots.inspect_tree(str(tree))
    assert (content.version, content.pretty_name, content.has_kernel, content.has_initrd) == (
        "2.1",
        "KubeOS 2.1",
        True,
        False,
    )


# --- slots.parse_os_release -------------------------------------------------------------------------


def test_parse_os_release_unquotes_and_skips_comments() -> None:
    text = (
        "# a comment\n"
        "\n"
        'NAME="KubeOS"\n'
        "ID=kubeos\n"
        "VERSION_ID='1.0.2'\n"
        'PRETTY_NAME="KubeOS 1.0 (\\"lts\\")"\n'
        'HOME_URL="https://example.org/?a=b"\n'
        'VARIANT="edge # nightly"\n'
        "  VARIANT_ID = server  \n"
        "EMPTY=\n"
        "not a variable line\n"
        'BROKEN="unterminated\n'
    )
    values = slots.parse_os_release(text)
    assert values == {
        "NAME": "KubeOS",
        "ID": "kubeos",
        "VERSION_ID": "1.0.2",
        "PRETTY_NAME": 'KubeOS 1.0 ("lts")',
        "HOME_URL": "https://example.org/?a=b",
        "VARIANT": "edge # nightly",
        "VARIANT_ID": "server",
        "EMPTY": "",
        "BROKEN": "unterminated",
    }


def test_slot_version_falls_back_from_version_id_to_version() -> None:
    assert slots.SlotContent(os_release={"VERSION": "22.03 (LTS-SP1)"}).version == "22.03 (LTS-SP1)"
    assert slots.SlotContent(os_release={"VERSION": "x", "VERSION_ID": "22.03"}).version == "22.03"
    assert slots.SlotContent().version == ""


# --- slots.matches_root -----------------------------------------------------------------------------


def _part(
    number: int,
    partlabel: str,
    *,
    fstype: str = "ext4",
    label: str | None = None,
    partuuid: str | None = None,
    fsuuid: str = "",
    node: str | None = None,
    type_guid: str = layout.GPT_LINUX,
) -> blockdev.Partition:
    return blockdev.Partition(
        number=number,
        node=node or f"/dev/fake0p{number}",
        start=number * MIB,
        size=64 * MIB,
        type_guid=type_guid,
        partuuid=partuuid if partuuid is not None else f"00000000-0000-4000-8000-00000000000{number}",
        partlabel=partlabel,
        fstype=fstype,
        label=partlabel if label is None else label,
        fsuuid=fsuuid,
    )


ROOT_A = _part(3, "ROOT-A", partuuid=PARTUUID_A, fsuuid="85e5bc70-c3e7-4665-856f-145022c9b5f9")


@pytest.mark.parametrize(
    "spec",
    [
        f"PARTUUID={PARTUUID_A}",
        f"PARTUUID={PARTUUID_A.upper()}",
        f'PARTUUID="{PARTUUID_A}"',
        "LABEL=ROOT-A",
        "PARTLABEL=ROOT-A",
        "UUID=85E5BC70-C3E7-4665-856F-145022C9B5F9",
        "UUID=85e5bc70-c3e7-4665-856f-145022c9b5f9",
    ],
)
def test_matches_root_recognises_every_way_of_naming_the_partition(spec: str) -> None:
    assert slots.matches_root(ROOT_A, spec)


@pytest.mark.parametrize(
    "spec",
    [
        f"PARTUUID={PARTUUID_B}",
        "LABEL=ROOT-B",
        "LABEL=root-a",
        "PARTLABEL=ROOT-B",
        "UUID=6061982e-62e4-42f4-ba02-3e1f12481470",
        "ROOT-A",
        f"FOO={PARTUUID_A}",
        "/dev/fake0p4",
    ],
)
def test_matches_root_does_not_match_other_partitions(spec: str) -> None:
    assert not slots.matches_root(ROOT_A, spec)


def test_matches_root_compares_device_paths_by_device_number(tmp_path: Path) -> None:
    # Real device nodes: /dev/null and /dev/zero always exist.
    part = _part(3, "ROOT-A", node="/dev/null")
    assert slots.matches_root(part, "/dev/null")
    assert not slots.matches_root(part, "/dev/zero")
    # A path that does not exist (a name in a kernel command line) is compared as a path.
    assert slots.matches_root(_part(3, "ROOT-A", node="/dev/kubeos-test-nonexistent3"), "/dev/kubeos-test-nonexistent3")
    assert not slots.matches_root(_part(3, "ROOT-A", node="/dev/kubeos-test-nonexistent3"), "/dev/kubeos-test-other")


# --- slots.recognise ----------------------------------------------------------------------------------


def _kubeos_table(*, bios: bool = False) -> blockdev.PartitionTable:
    parts = []
    if bios:
        parts.append(_part(1, "BIOS", fstype="", label="", type_guid=layout.GPT_BIOS))
    first = len(parts) + 1
    parts += [
        _part(first, "ESP", fstype="vfat", type_guid=layout.GPT_ESP),
        _part(first + 1, "BOOT"),
        _part(first + 2, "ROOT-A", partuuid=PARTUUID_A),
        _part(first + 3, "ROOT-B", partuuid=PARTUUID_B),
        _part(first + 4, "PERSIST"),
    ]
    return blockdev.PartitionTable(disk="/dev/fake0", label="gpt", sector_size=512, size=4096 * MIB, partitions=parts)


@pytest.mark.parametrize("bios", [False, True], ids=["uefi", "bios"])
def test_recognise_finds_the_kubeos_layout_by_partition_names(bios: bool) -> None:
    found = slots.recognise(_kubeos_table(bios=bios))
    assert found.kind == slots.LAYOUT_KUBEOS
    assert found.esp is not None and found.esp.partlabel == "ESP"
    assert (found.boot.partlabel, found.persist.partlabel) == ("BOOT", "PERSIST")
    assert {name: p.partuuid for name, p in found.slots.items()} == {"A": PARTUUID_A, "B": PARTUUID_B}
    assert (found.bios is not None) is bios


def test_recognise_finds_a_kubeos_built_disk_by_its_vfat_boot_and_filesystem_labels() -> None:
    # KubeOS's image builder: vfat BOOT, then ext4 ROOT-A, ROOT-B, PERSIST (no ESP, no kubeos names).
    parts = [
        _part(1, "", fstype="vfat", label="BOOT", type_guid=layout.GPT_ESP),
        _part(2, "", label="ROOT-A", partuuid=PARTUUID_A),
        _part(3, "", label="ROOT-B", partuuid=PARTUUID_B),
        _part(4, "", label="PERSIST"),
    ]
    table = blockdev.PartitionTable(disk="/dev/fake1", label="gpt", sector_size=512, size=4096 * MIB, partitions=parts)
    found = slots.recognise(table)
    assert found.kind == slots.LAYOUT_LEGACY
    assert found.boot.node == "/dev/fake0p1" and found.esp is None
    assert (found.slots["A"].partuuid, found.slots["B"].partuuid) == (PARTUUID_A, PARTUUID_B)
    assert found.persist.label == "PERSIST"


@pytest.mark.parametrize(
    "partitions",
    [
        [],
        [_part(1, "Linux filesystem", label="data")],
        [_part(1, "EFI", fstype="vfat", label="EFI"), _part(2, "root", label="rootfs")],
        # Named like kubeos, but ROOT-B is missing: neither layout.
        [_part(1, "ESP", fstype="vfat"), _part(2, "BOOT"), _part(3, "ROOT-A"), _part(4, "PERSIST")],
    ],
    ids=["empty", "one-data-partition", "ordinary-distribution", "kubeos-without-root-b"],
)
def test_recognise_refuses_a_foreign_disk_saying_what_it_found_and_what_to_do(
    partitions: list[blockdev.Partition],
) -> None:
    table = blockdev.PartitionTable(
        disk="/dev/fake9", label="gpt", sector_size=512, size=4096 * MIB, partitions=partitions
    )
    with pytest.raises(slots.LayoutError) as err:
        slots.recognise(table)
    message = str(err.value)
    assert message.startswith("/dev/fake9 does not hold a kubeos layout")
    assert "kubeos.os.disk_layout" in message
    if partitions:
        for part in partitions:
            assert part.node in message
    else:
        assert "no partitions" in message


# --- bootcontrol.plan ---------------------------------------------------------------------------------

OS_RELEASE = {"ID": "kubeos", "VERSION_ID": "2"}


def _content(kind: str) -> slots.SlotContent:
    if kind == "os":
        return slots.SlotContent(os_release=dict(OS_RELEASE), has_kernel=True, has_initrd=True)
    if kind == "no-kernel":
        return slots.SlotContent(os_release=dict(OS_RELEASE), has_kernel=False)
    if kind == "no-os-release":
        return slots.SlotContent(os_release={}, has_kernel=True)
    assert kind == "empty"
    return slots.SlotContent()


def _state(
    env: dict[str, str],
    *,
    a: str = "os",
    b: str = "os",
    running: str | None = None,
    kind: str = slots.LAYOUT_KUBEOS,
) -> slots.DiskState:
    table = _kubeos_table()
    by_name = {p.partlabel: p for p in table.partitions}
    disk_layout = slots.DiskLayout(
        kind=kind,
        disk=table.disk,
        boot=by_name["BOOT"],
        slots={"A": by_name["ROOT-A"], "B": by_name["ROOT-B"]},
        persist=by_name["PERSIST"],
        esp=by_name["ESP"] if kind == slots.LAYOUT_KUBEOS else None,
        table=table,
    )
    grub = slots.grub_state(kind, env)
    facts = {
        name: slots.SlotFacts(name, disk_layout.slots[name], _content(what), grub.marked_bootable[name])
        for name, what in (("A", a), ("B", b))
    }
    running_root = f"PARTUUID={disk_layout.slots[running].partuuid}" if running else None
    return slots.DiskState(layout=disk_layout, grub=grub, slots=facts, running_root=running_root, running_slot=running)


WRITTEN_B = {"kubeos_default": "A", "kubeos_A_bootable": "yes", "kubeos_B_bootable": "yes"}


def test_trial_defaults_to_the_inactive_slot_with_three_tries() -> None:
    change = bootcontrol.plan(_state(WRITTEN_B), "trial")
    assert change.slot == "B"
    assert change.set_vars == {"kubeos_trial": "B", "kubeos_tries": "3", "kubeos_trial_failed": None}
    assert "slot A stays committed" in change.message


def test_trial_defaults_to_a_when_b_is_committed() -> None:
    change = bootcontrol.plan(_state({**WRITTEN_B, "kubeos_default": "B"}), "trial", tries=1)
    assert (change.slot, change.set_vars["kubeos_tries"]) == ("A", "1")


def test_trial_of_the_committed_slot_is_refused() -> None:
    with pytest.raises(slots.SlotError, match="slot A is already the committed slot"):
        bootcontrol.plan(_state(WRITTEN_B), "trial", slot="A")


@pytest.mark.parametrize(
    ("env", "b", "reason"),
    [
        ({**WRITTEN_B, "kubeos_B_bootable": "no"}, "os", "slot B is marked not bootable"),
        (WRITTEN_B, "no-kernel", "holds no kernel at /boot/vmlinuz"),
        (WRITTEN_B, "no-os-release", "holds no /etc/os-release or /usr/lib/os-release"),
        (WRITTEN_B, "empty", "holds no /etc/os-release"),
    ],
    ids=["marked-not-bootable", "no-kernel", "no-os-release", "empty"],
)
def test_trial_of_a_slot_that_cannot_boot_is_refused_with_the_reason(env: dict[str, str], b: str, reason: str) -> None:
    with pytest.raises(slots.SlotError) as err:
        bootcontrol.plan(_state(env, b=b), "trial", slot="B")
    assert str(err.value).startswith("refusing to arm a trial boot of slot B: ")
    assert reason in str(err.value)


@pytest.mark.parametrize("tries", [0, -1, grubcfg.MAX_TRIES + 1, 100])
def test_trial_tries_out_of_range_are_refused(tries: int) -> None:
    with pytest.raises(slots.SlotError, match=f"tries must be between 1 and {grubcfg.MAX_TRIES}, got {tries}"):
        bootcontrol.plan(_state(WRITTEN_B), "trial", tries=tries)


@pytest.mark.parametrize("tries", [1, grubcfg.MAX_TRIES])
def test_trial_tries_at_the_limits_are_accepted(tries: int) -> None:
    assert bootcontrol.plan(_state(WRITTEN_B), "trial", tries=tries).set_vars["kubeos_tries"] == str(tries)


def test_committed_defaults_to_the_running_slot_and_clears_the_trial() -> None:
    state = _state({**WRITTEN_B, "kubeos_trial": "B", "kubeos_tries": "2"}, running="B")
    change = bootcontrol.plan(state, "committed")
    assert change.slot == "B"
    assert change.set_vars == {"kubeos_default": "B", "kubeos_trial": None, "kubeos_tries": None}


def test_committed_refuses_a_slot_that_is_not_running() -> None:
    state = _state({**WRITTEN_B, "kubeos_trial": "B", "kubeos_tries": "2"}, running="A")
    with pytest.raises(slots.SlotError, match=r"refusing to commit slot B: the system runs slot A.*state=rollback"):
        bootcontrol.plan(state, "committed", slot="B")


def test_committed_on_a_disk_that_is_not_running_commits_the_trial_slot() -> None:
    state = _state({**WRITTEN_B, "kubeos_trial": "B", "kubeos_tries": "3"})
    change = bootcontrol.plan(state, "committed")
    assert change.slot == "B"
    assert change.set_vars == {"kubeos_default": "B", "kubeos_trial": None, "kubeos_tries": None}


def test_committed_without_a_trial_keeps_the_committed_slot() -> None:
    change = bootcontrol.plan(_state(WRITTEN_B), "committed")
    assert change.slot == "A" and change.set_vars["kubeos_default"] == "A"


def test_committed_refuses_a_slot_without_an_os() -> None:
    with pytest.raises(slots.SlotError, match=r"refusing to commit slot B: slot B .* holds no kernel"):
        bootcontrol.plan(_state(WRITTEN_B, b="no-kernel"), "committed", slot="B")


def test_rollback_picks_the_other_slot_and_clears_any_trial() -> None:
    state = _state({**WRITTEN_B, "kubeos_default": "B", "kubeos_trial": "A", "kubeos_tries": "1"})
    change = bootcontrol.plan(state, "rollback")
    assert change.slot == "A"
    assert change.set_vars == {"kubeos_default": "A", "kubeos_trial": None, "kubeos_tries": None}


def test_rollback_from_the_running_slot_goes_to_the_other_one() -> None:
    state = _state({**WRITTEN_B, "kubeos_default": "B"}, running="A")
    assert bootcontrol.plan(state, "rollback").slot == "B"


def test_rollback_to_a_slot_that_cannot_boot_is_refused() -> None:
    state = _state({**WRITTEN_B, "kubeos_default": "B", "kubeos_A_bootable": "no"}, a="empty")
    with pytest.raises(slots.SlotError, match="refusing to roll back to slot A: slot A is marked not bootable"):
        bootcontrol.plan(state, "rollback")


def test_rollback_to_the_running_slot_is_refused() -> None:
    with pytest.raises(slots.SlotError, match="refusing to roll back to slot B: it is the running system"):
        bootcontrol.plan(_state(WRITTEN_B, running="B"), "rollback", slot="B")


def test_unknown_state_is_refused() -> None:
    with pytest.raises(slots.SlotError, match="unknown state 'reboot'"):
        bootcontrol.plan(_state(WRITTEN_B), "reboot")


def test_legacy_disk_refuses_a_trial_boot() -> None:
    state = _state({"saved_entry": "A"}, kind=slots.LAYOUT_LEGACY)
    with pytest.raises(slots.SlotError, match=r"laid out by KubeOS.*no trial boot"):
        bootcontrol.plan(state, "trial", slot="B")


def test_legacy_disk_rollback_sets_saved_entry_to_the_other_slot() -> None:
    state = _state({"saved_entry": "A"}, kind=slots.LAYOUT_LEGACY)
    change = bootcontrol.plan(state, "rollback")
    assert (change.slot, change.set_vars) == ("B", {"saved_entry": "B"})
    running_b = _state({"saved_entry": "A"}, kind=slots.LAYOUT_LEGACY, running="B")
    assert bootcontrol.plan(running_b, "rollback").set_vars == {"saved_entry": "A"}


def test_legacy_disk_commit_sets_saved_entry_to_the_running_slot() -> None:
    state = _state({"saved_entry": "A"}, kind=slots.LAYOUT_LEGACY, running="B")
    assert bootcontrol.plan(state, "committed").set_vars == {"saved_entry": "B"}


def test_legacy_disk_rollback_refuses_a_slot_without_an_os() -> None:
    state = _state({"saved_entry": "B"}, a="empty", kind=slots.LAYOUT_LEGACY)
    with pytest.raises(slots.SlotError, match=r"refusing to make slot A the boot default: .* holds no /etc/os-release"):
        bootcontrol.plan(state, "rollback")
