"""The OS object's ``timewindow``: when new nodes may start.

Both ends are ``HH:MM:SS`` (every day; a window whose end is before its start wraps past midnight) or both
``YYYY-MM-DD HH:MM:SS`` (one stretch of time). Both empty: always open. Times are the operator's local time,
as in KubeOS (the operator image runs in UTC unless TZ says otherwise).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from .models import TimeWindow

_TIME = "%H:%M:%S"
_DATETIME = "%Y-%m-%d %H:%M:%S"


class WindowError(ValueError):
    """A time window that cannot be read; the message says what to write instead."""


@dataclass(frozen=True)
class Window:
    """A parsed window: either daily times or two datetimes."""

    start_time: datetime.time | None = None
    end_time: datetime.time | None = None
    start: datetime.datetime | None = None
    end: datetime.datetime | None = None

    @property
    def always(self) -> bool:
        return self.start_time is None and self.start is None

    def is_open(self, now: datetime.datetime) -> bool:
        if self.start is not None and self.end is not None:
            return self.start <= now.replace(tzinfo=None) <= self.end
        if self.start_time is not None and self.end_time is not None:
            t = now.time().replace(microsecond=0, tzinfo=None)
            if self.start_time <= self.end_time:
                return self.start_time <= t <= self.end_time
            return t >= self.start_time or t <= self.end_time  # wraps past midnight
        return True

    def describe(self) -> str:
        if self.start is not None and self.end is not None:
            return f"{self.start:{_DATETIME}} to {self.end:{_DATETIME}}"
        if self.start_time is not None and self.end_time is not None:
            return f"{self.start_time:{_TIME}} to {self.end_time:{_TIME}} daily"
        return "always"


def _parse(text: str, form: str) -> datetime.datetime | None:
    try:
        return datetime.datetime.strptime(text, form)
    except ValueError:
        return None


def parse(window: TimeWindow) -> Window:
    start, end = window.starttime.strip(), window.endtime.strip()
    if not start and not end:
        return Window()
    if not start or not end:
        raise WindowError(
            f"timewindow needs both starttime and endtime (got starttime {start!r}, endtime {end!r}); "
            "leave both empty for always"
        )
    for form in (_TIME, _DATETIME):
        a, b = _parse(start, form), _parse(end, form)
        if a is not None and b is not None:
            if form == _TIME:
                return Window(start_time=a.time(), end_time=b.time())
            if b < a:
                raise WindowError(f"timewindow ends ({end}) before it starts ({start})")
            return Window(start=a, end=b)
    raise WindowError(f"timewindow {start!r} to {end!r}: write both as HH:MM:SS (daily) or both as YYYY-MM-DD HH:MM:SS")
