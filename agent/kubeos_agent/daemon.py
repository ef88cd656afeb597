"""``kubeos-agent``: the node daemon's entry point (configuration, logs, signals around ``service.Agent``).

Exit codes: 0 after a clean stop (SIGTERM/SIGINT), 1 when it cannot run (journal, socket), 2 for a bad
configuration.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
from pathlib import Path
from types import FrameType

from . import __version__, logs
from . import config as config_mod

log = logging.getLogger("kubeos_agent")


def activate_collection(collections_path: Path) -> None:
    """Make ``ansible_collections.kubeos.os`` importable from the configured collections path."""
    if not (collections_path / "ansible_collections" / "kubeos" / "os").is_dir():
        raise config_mod.ConfigError(
            f"collections_path {collections_path} holds no ansible_collections/kubeos/os; "
            "install the kubeos.os collection there or point collections_path at it"
        )
    path = str(collections_path)
    if path not in sys.path:
        sys.path.insert(0, path)


def sd_notify(state: str) -> None:
    """Tell systemd (Type=notify) how the service is doing; a no-op outside systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("cannot notify systemd", extra={"fields": {"error": str(exc)}})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kubeos-agent", description="kubeos os-agent (node daemon)")
    parser.add_argument(
        "--config",
        "-c",
        help=f"configuration file (default: ${config_mod.CONFIG_ENV}, else {config_mod.DEFAULT_CONFIG_PATH} if it exists)",
    )
    parser.add_argument("--version", action="version", version=f"kubeos-agent {__version__}")
    args = parser.parse_args(argv)
    try:
        config = config_mod.load(args.config)
        logs.setup(config.log_format, config.log_level)
        activate_collection(config.collections_path)
    except config_mod.ConfigError as exc:
        print(f"kubeos-agent: {exc}", file=sys.stderr)
        return 2
    # Imported only now: it imports the collection's module_utils.
    from .journal import JournalError
    from .service import Agent

    agent = Agent(config)
    started = threading.Event()
    stopping = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        if stopping.is_set():
            return
        stopping.set()
        log.info("stopping", extra={"fields": {"signal": signal.Signals(signum).name}})
        sd_notify("STOPPING=1")
        if started.is_set():
            # Stopping waits for serve_forever to return, so it must not run in the serving (main) thread.
            threading.Thread(target=agent.stop, name="stop", daemon=False).start()
        # Otherwise main() sees ``stopping`` right after start-up.

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        agent.start()
    except JournalError as exc:
        log.error(str(exc))
        return 1
    except OSError as exc:  # includes api.SocketInUse
        log.error(
            "cannot listen on the socket", extra={"fields": {"socket": str(config.socket_path), "error": str(exc)}}
        )
        return 1
    started.set()
    if stopping.is_set():  # a signal came while starting
        agent.stop()
        return 0
    sd_notify(f"READY=1\nSTATUS=listening on {config.socket_path}\nMAINPID={os.getpid()}")
    agent.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
