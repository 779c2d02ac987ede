"""One key=value line per connection and per message, Postfix field names, text or JSON.

Written straight to a stream rather than through `logging`: two lines per message on the hot path
must cost microseconds. Inside an event loop, lines are gathered for at most `FLUSH_DELAY` seconds
(or `MAX_PENDING` lines) and written together: a busy worker makes one write for many sessions
instead of one per loop iteration, and `flush()` at shutdown writes what is left. Values are
sanitised (every character that is not printable becomes a space) so a client cannot forge a log
line through its HELO name or an address.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import time
from collections.abc import Mapping
from typing import TextIO

FLUSH_DELAY = 0.05  # seconds a line may wait for others to share its write
MAX_PENDING = 256  # lines that are written at once, whatever the delay

# A value written as it is: printable ASCII but for space and '"'. Anything else takes _quoted.
_BARE = re.compile(r"[!#-~]+").fullmatch


def _quoted(text: str) -> str:
    """Every character that is not printable (CR, LF, ESC, U+2028, ...) becomes a space, so no
    value can start a line of its own; a value that is empty, spaced or quoted is quoted."""
    if not text.isprintable():
        text = "".join(c if c.isprintable() else " " for c in text)
    if not text or " " in text or '"' in text:
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


class EventLog:
    """Formats and writes log lines; one instance per process."""

    def __init__(self, stream: TextIO | None = None, *, fmt: str = "text") -> None:
        self.stream = stream or sys.stdout
        self.fmt = fmt
        self._pid = os.getpid()
        self._second = -1
        self._stamp = ""
        self._pending: list[str] = []

    def _now(self) -> str:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
        return self._stamp

    def line(self, sid: str, event: str, fields: Mapping[str, object]) -> None:
        if self.fmt == "json":
            record: dict[str, object] = {"ts": self._now(), "pid": self._pid, "id": sid}
            record["event"] = event
            record.update({k: v for k, v in fields.items() if v is not None})
            text = json.dumps(record, default=str)
        else:
            parts = [f"{self._now()} sk[{self._pid}]: {sid}: {event}"]
            for key, value in fields.items():
                if value is not None:
                    text = value if value.__class__ is str else str(value)
                    parts.append(f"{key}={text if _BARE(text) else _quoted(text)}")
            text = " ".join(parts)
        pending = self._pending
        pending.append(text)
        if len(pending) == 1:
            try:
                asyncio.get_running_loop().call_later(FLUSH_DELAY, self.flush)
            except RuntimeError:  # no loop: write now
                self.flush()
        elif len(pending) >= MAX_PENDING:
            self.flush()  # the timer still fires; it finds nothing, or the next batch

    def flush(self) -> None:
        lines, self._pending = self._pending, []
        if not lines:
            return
        try:
            self.stream.write("\n".join(lines) + "\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass  # a closed stdout must not take sessions down with it
