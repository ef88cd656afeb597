"""Fixtures of the agent tests.

The node disk templates come from the session fixture ``images`` of tests/conftest.py (also used by the
cluster tests). Every test works on its own sparse copy, with its own socket, journal, artifacts and a
reboot command that only records that it was called.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import Images, detach_all

from .helpers import Node, loop_devices_over, node_settings, partitions_of

__all__ = ["Images", "make_node"]


@pytest.fixture
def make_node(images: Images, tmp_path: Path) -> Iterator[Callable[..., Node]]:
    """``make_node("fresh" | "prepared")``: a private copy of a template with its agent configuration."""
    made: list[Node] = []

    def make(template: str = "fresh") -> Node:
        root = tmp_path / f"node{len(made)}"
        root.mkdir()
        (root / "certs").mkdir()
        image = root / "disk.img"
        subprocess.run(["cp", "--sparse=always", str(getattr(images, template)), str(image)], check=True)
        partitions = partitions_of(image)
        node = Node(root=root, image=image, partitions=partitions)
        node.configure(**node_settings(root, image, partitions))
        made.append(node)
        return node

    try:
        yield make
    finally:
        for node in made:
            detach_all(node.image)
            assert loop_devices_over(node.image) == [], "a loop device was left over the node's disk"
