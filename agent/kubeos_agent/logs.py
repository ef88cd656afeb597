"""Structured logs on stderr, one record per line (journald stores each line as one entry).

``json``: ``{"ts": …, "level": "info", "logger": "kubeos_agent.operations", "msg": "…", "operation": "op-…"}``;
``logfmt``: ``ts=… level=info logger=… msg="…" operation=op-…``. Structured fields come from
``extra={"fields": {...}}``. Under systemd the timestamp is redundant but harmless, and the level is
also given as a ``<N>`` syslog prefix when ``JOURNAL_STREAM`` says stderr goes to the journal, so
``journalctl -p warning`` works.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys
from typing import Any

_SYSLOG_PRIORITY = {"DEBUG": 7, "INFO": 6, "WARNING": 4, "ERROR": 3, "CRITICAL": 2}


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = getattr(record, "fields", None)
    return dict(fields) if isinstance(fields, dict) else {}


class _Formatter(logging.Formatter):
    def __init__(self, style: str, journal: bool) -> None:
        super().__init__()
        self.kind = style
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": datetime.datetime.fromtimestamp(record.created, tz=datetime.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        data.update(_fields(record))
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        line = json.dumps(data, default=str) if self.kind == "json" else _logfmt(data)
        if self.journal:
            line = f"<{_SYSLOG_PRIORITY.get(record.levelname, 6)}>{line}"
        return line


def _logfmt_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if text and not any(c in text for c in ' "=\n\t\\'):
        return text
    return json.dumps(text)


def _logfmt(data: dict[str, Any]) -> str:
    return " ".join(f"{key}={_logfmt_value(value)}" for key, value in data.items())


def setup(style: str = "json", level: str = "info") -> None:
    """Send every log record of the process to stderr in ``style``."""
    # systemd sets JOURNAL_STREAM to "<dev>:<inode>" of the stream it connected to stderr.
    journal = False
    stream = os.environ.get("JOURNAL_STREAM", "")
    if stream:
        try:
            st = os.fstat(sys.stderr.fileno())
            journal = stream == f"{st.st_dev}:{st.st_ino}"
        except (OSError, ValueError):
            journal = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(style, journal))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # ansible-runner logs every event at debug level; keep it to warnings.
    logging.getLogger("ansible-runner").setLevel(logging.WARNING)
