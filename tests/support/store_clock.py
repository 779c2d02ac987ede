"""A real SQLite store on a clock the test moves, for unit tests of what uses the store."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

from spamkiller.store.sqlite import SqliteStore


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def with_store(tmp_path: Path, body: Callable[[SqliteStore, Clock], Awaitable[None]]) -> None:
    """Run `body(store, clock)` on a fresh store in `tmp_path`, closing it afterwards."""

    async def main() -> None:
        clock = Clock()
        store = await SqliteStore.open(tmp_path / "s.db", clock=clock)
        try:
            await body(store, clock)
        finally:
            await store.close()

    asyncio.run(main())
