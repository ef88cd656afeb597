"""Host access to a disk image's partitions while no VM runs on it: mount by GPT name, queue test actions."""

from __future__ import annotations

import contextlib
import json
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _partition_node(loop: str, partlabel: str) -> str:
    table = json.loads(subprocess.run(["sfdisk", "--json", loop], capture_output=True, text=True, check=True).stdout)
    for part in table["partitiontable"]["partitions"]:
        if part.get("name") == partlabel:
            return str(part["node"])
    raise LookupError(f"no partition named {partlabel} on {loop}")


@contextlib.contextmanager
def mounted_partition(image: Path, partlabel: str = "PERSIST") -> Iterator[Path]:
    """Mount a partition (by GPT name) of a disk image file on the host; unmount and detach in finally.

    Only while no VM runs on the image.
    """
    loop = subprocess.run(
        ["losetup", "--find", "--show", "--partscan", str(image)], capture_output=True, text=True, check=True
    ).stdout.strip()
    mountpoint = Path(tempfile.mkdtemp(prefix=f"kubeos-{partlabel.lower()}."))
    mounted = False
    try:
        # losetup --partscan alone does not make the partition nodes on every host.
        subprocess.run(["partx", "--update", loop], capture_output=True, check=False)
        node = _partition_node(loop, partlabel)
        subprocess.run(["mount", "-t", "ext4", node, str(mountpoint)], capture_output=True, text=True, check=True)
        mounted = True
        yield mountpoint
    finally:
        if mounted:
            subprocess.run(["sync"], check=False)
            subprocess.run(["umount", str(mountpoint)], check=False)
        subprocess.run(["partx", "--delete", loop], capture_output=True, check=False)
        subprocess.run(["losetup", "--detach", loop], check=False)
        with contextlib.suppress(OSError):
            mountpoint.rmdir()


def queue_actions(image: Path, actions: list[str]) -> None:
    """Replace the test OS' action queue (/persist/test/actions) on the image's PERSIST."""
    with mounted_partition(image) as root:
        (root / "test").mkdir(exist_ok=True)
        (root / "test/actions").write_text("".join(f"{line}\n" for line in actions))
