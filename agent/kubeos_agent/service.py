"""The agent put together: journal, operations, socket server, and the start-up recovery.

Start-up order: journal ready → interrupted operations recovered → socket bound (status works from
here on) → the after-reboot decision (health checks may take minutes; the API answers meanwhile and
refuses other operations with 409 while ``verify_upgrade`` runs). ``daemon.main`` wraps this with
configuration, logging and signals; tests run it in a thread.
"""

from __future__ import annotations

import logging
import threading

from . import __version__, api, boot
from .config import AgentConfig
from .journal import Journal
from .operations import OperationManager

log = logging.getLogger(__name__)


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.journal = Journal(config.journal_dir, config.journal_keep)
        self.manager = OperationManager(config, self.journal)
        self.server: api.AgentServer | None = None
        self._state_lock = threading.Lock()
        self._serving = False
        self._stop_requested = False
        self._stopped = threading.Event()

    def start(self) -> None:
        """Recover, listen, and act on the boot that just happened (raises when it cannot listen)."""
        self.journal.prepare()
        boot.recover_interrupted(self.manager)
        self.server = api.AgentServer(self.config.socket_path, api.Api(self.manager), self.config.allowed_uids)
        log.info(
            "kubeos agent listening",
            extra={
                "fields": {
                    "socket": str(self.config.socket_path),
                    "version": __version__,
                    "journal": str(self.config.journal_dir),
                }
            },
        )
        try:
            boot.reconcile(self.manager)
        except Exception:
            log.exception("the after-reboot check failed")

    def serve_forever(self) -> None:
        if self.server is None:
            raise RuntimeError("start() first")
        with self._state_lock:
            if self._stop_requested:
                self._stopped.set()
                return
            self._serving = True
        try:
            # A shutdown() that came before this call makes it return at once.
            self.server.serve_forever(poll_interval=0.2)
        finally:
            self._stopped.set()

    def stop(self) -> None:
        """Stop serving (from any thread but the serving one), finish or cancel the running operation."""
        with self._state_lock:
            self._stop_requested = True
            serving = self._serving
        if self.server is not None and serving:
            self.server.shutdown()  # returns once serve_forever has
            self._stopped.wait(timeout=10)
        self.manager.shutdown(timeout=self.config.cancel_grace + 10)
        if self.server is not None:
            self.server.server_close()
        log.info("stopped")
