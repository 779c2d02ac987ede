"""A wait with a deadline whose timer is re-armed lazily.

A busy connection waits for input thousands of times; creating and cancelling a timer for each wait
costs more than the wait. `Wakeup` keeps at most one timer per connection: it fires at the earliest
deadline it was armed for, and if a later wait pushed the deadline out it simply re-arms. Used by
the inbound driver and the relay; stdlib only.
"""

from __future__ import annotations

import asyncio


class Wakeup:
    """`await wakeup.wait(timeout)` returns True when `wake()` is called, False at the deadline."""

    __slots__ = ("_armed_at", "_deadline", "_future", "_loop", "_timer")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._future: asyncio.Future[bool] | None = None
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._armed_at = 0.0

    def wake(self) -> None:
        future = self._future
        if future is not None and not future.done():
            future.set_result(True)

    async def wait(self, timeout: float) -> bool:
        loop = self._loop
        deadline = self._deadline = loop.time() + timeout
        if self._timer is None or self._armed_at > deadline:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = loop.call_at(deadline, self._fire)
            self._armed_at = deadline
        future: asyncio.Future[bool] = loop.create_future()
        self._future = future
        try:
            return await future
        finally:
            self._future = None

    def _fire(self) -> None:
        self._timer = None
        if self._future is None or self._future.done():
            return  # nobody waiting: the next wait arms a new timer
        if self._loop.time() < self._deadline:
            self._timer = self._loop.call_at(self._deadline, self._fire)
            self._armed_at = self._deadline
            return
        self._future.set_result(False)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
