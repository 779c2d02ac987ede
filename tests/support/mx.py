"""Run a real Spam Killer worker in a background thread, with its own event loop and sockets.

Tests talk to it over 127.0.0.1 like any client would. Signals need a process of their own: the
tests of SIGTERM and SIGHUP start `spam-killer run` as a subprocess instead.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from spamkiller.config import Config, load
from spamkiller.observability.logging import EventLog
from spamkiller.server.app import Worker


class LogLines:
    """A text stream that keeps lines in memory."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._part = ""

    def write(self, text: str) -> int:
        self._part += text
        *done, self._part = self._part.split("\n")
        self.lines.extend(done)
        return len(text)

    def flush(self) -> None:
        pass

    def find(self, *needles: str) -> list[str]:
        return [line for line in list(self.lines) if all(n in line for n in needles)]

    def wait_for(self, *needles: str, count: int = 1, timeout: float = 5.0) -> list[str]:
        """The lines with every needle, once there are `count` of them (or at the timeout).

        The server gathers its lines for up to `FLUSH_DELAY` before writing them, so a line
        lags the reply it goes with. A test that asserts a line is absent first waits for a
        later line of the same session (its disconnect, say): lines are written in order.
        """
        deadline = time.monotonic() + timeout
        while len(found := self.find(*needles)) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        return found


class Mx:
    """`with Mx(tmp_path, config_dict) as mx:` then connect to `mx.port()`."""

    def __init__(self, tmp_path: Path, config: dict[str, Any]) -> None:
        self.path = tmp_path / "spam-killer.yaml"
        self.path.write_text(yaml.safe_dump(config))
        self.config: Config = load(self.path)
        self.log = LogLines()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.worker: Worker | None = None

    def port(self, name: str | None = None) -> int:
        for listener in self.config.listeners:
            if name is None or listener.name == name:
                return listener.port
        raise KeyError(name)

    def _main(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            log = EventLog(self.log)  # type: ignore[arg-type]
            self.worker = Worker(
                self.path, self.config, log, reuse_port=False, dev=True, create_cert=True
            )
            loop.run_until_complete(self.worker.start(signals=False))
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        loop.run_until_complete(self.worker.serve_until_stopped())
        loop.close()

    def __enter__(self) -> Mx:
        self._thread = threading.Thread(target=self._main, daemon=True)
        self._thread.start()
        self._ready.wait(20)
        if self._error is not None:
            raise self._error
        return self

    def call(self, fn: Any, *args: Any) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(fn, *args)

    def reload(self) -> None:
        assert self.worker is not None
        self.call(self.worker.reload)

    def __exit__(self, *exc: object) -> None:
        if self.worker is not None and self._loop is not None and self._loop.is_running():
            self.worker.config = self.worker.config.model_copy(update={"shutdown_timeout": 0.5})
            self.call(self.worker.stop)
        if self._thread is not None:
            self._thread.join(10)
