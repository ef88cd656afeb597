"""Kill a real slot_write in the middle of its write (SIGKILL to ansible-playbook and the module).

The image is fed through a FIFO, one MiB every 0.1 s, up to half its size; once the module's
progress file shows ``min_bytes`` written, the whole process group is killed. The loop device
the killed module could not detach is detached (only loop devices over ``device``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

MIB = 1024 * 1024


def _start_playbook(workdir: Path, collections: Path, args: dict[str, object]) -> subprocess.Popen[bytes]:
    """ansible-playbook with one slot_write task, in its own process group (kill -9 takes the module too)."""
    play = [
        {
            "hosts": "localhost",
            "gather_facts": False,
            "vars": {"ansible_connection": "local", "ansible_python_interpreter": sys.executable},
            "tasks": [{"kubeos.os.slot_write": args}],
        }
    ]
    (workdir / "play.yml").write_text(yaml.safe_dump(play))
    env = {
        **os.environ,
        "ANSIBLE_COLLECTIONS_PATH": str(collections),
        "ANSIBLE_LOCALHOST_WARNING": "False",
        "ANSIBLE_INVENTORY_UNPARSED_WARNING": "False",
    }
    return subprocess.Popen(
        [str(Path(sys.executable).parent / "ansible-playbook"), "-i", "localhost,", str(workdir / "play.yml")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def kill_slot_write_midway(
    workdir: Path, collections: Path, device: Path, image: Path, sha256: str, *, min_bytes: int = 1
) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    fifo = workdir / "source"
    os.mkfifo(fifo)
    progress = workdir / "progress.json"
    proc = _start_playbook(
        workdir,
        collections,
        {
            "device": str(device),
            "src": f"file://{fifo}",
            "sha256": sha256,
            "progress_file": str(progress),
        },
    )
    stop = threading.Event()

    def feed() -> None:
        with open(fifo, "wb") as pipe, open(image, "rb") as src:
            for _chunk in range(os.path.getsize(image) // 2 // MIB):
                if stop.is_set():
                    return
                pipe.write(src.read(MIB))
                pipe.flush()
                time.sleep(0.1)
            stop.wait(120)  # hold the pipe open: the module waits for more, mid-write

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    try:
        deadline = time.monotonic() + 90
        done = 0
        while time.monotonic() < deadline and done < min_bytes:
            if progress.exists():
                report = json.loads(progress.read_text())
                done = report["bytes_done"] if report["phase"] == "writing" else 0
            time.sleep(0.1)
        if done < min_bytes:
            output = proc.stdout.read1() if proc.stdout and proc.poll() is not None else b""
            raise AssertionError(f"the write did not get going (bytes done: {done}): {output!r}")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        stop.set()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        feeder.join(timeout=10)
        loops = subprocess.run(
            ["losetup", "--associated", str(device), "--noheadings", "--output", "NAME"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.split()
        for loop in loops:
            subprocess.run(["losetup", "--detach", loop], check=False)
        # The kernel releases a detached loop device in the background: wait until it is gone.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(
            os.path.exists(f"/sys/block/{Path(loop).name}/loop") for loop in loops
        ):
            time.sleep(0.1)
