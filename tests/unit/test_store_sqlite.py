"""What only the SQLite store promises: its file format, its writer thread, batching, sweeping."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from spamkiller.store import StoreError, open_store
from spamkiller.store.base import SCHEMA_VERSION
from spamkiller.store.sqlite import TABLES, SqliteStore


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def run(body: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(body())


def rows(path: Path, sql: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(path) as db:
        return db.execute(sql).fetchall()


def test_new_file_is_migrated_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "state.db"

    async def body() -> None:
        store = await open_store(f"sqlite:///{path}")
        await store.close()

    run(body)
    versions = rows(path, "SELECT version, description FROM schema_migrations")
    assert [v for v, _ in versions] == list(range(1, SCHEMA_VERSION + 1))
    assert rows(path, "PRAGMA journal_mode") == [("wal",)]
    tables = {name for (name,) in rows(path, "SELECT name FROM sqlite_master WHERE type='table'")}
    assert tables == {*TABLES, "schema_migrations"}


def test_records_survive_a_restart_and_migrations_run_once(tmp_path: Path) -> None:
    path = tmp_path / "state.db"

    async def body() -> None:
        store = await SqliteStore.open(path)
        first = await store.greylist("k", delay=10, expire=100, now=5000.0)
        await store.close()
        store = await SqliteStore.open(path)
        again = await store.greylist("k", delay=10, expire=100, now=5011.0)
        await store.close()
        assert again.passed and again.first_seen == first.first_seen == 5000.0

    run(body)
    assert len(rows(path, "SELECT * FROM schema_migrations")) == SCHEMA_VERSION


def test_a_file_from_a_newer_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    run(lambda: _open_close(path))
    with sqlite3.connect(path) as db:
        db.execute("INSERT INTO schema_migrations VALUES (?, 'from the future', 0)", (99,))
    with pytest.raises(StoreError, match="schema version 99 was written by a newer"):
        run(lambda: _open_close(path))


async def _open_close(path: Path) -> None:
    store = await SqliteStore.open(path)
    await store.close()


@pytest.mark.parametrize("kind", ["not a database", "missing directory"])
def test_unusable_files_fail_at_open(tmp_path: Path, kind: str) -> None:
    if kind == "not a database":
        path = tmp_path / "state.db"
        path.write_bytes(b"this is not sqlite" * 100)
    else:
        path = tmp_path / "nowhere" / "state.db"
    started = time.monotonic()
    with pytest.raises(StoreError, match=str(path)):
        run(lambda: _open_close(path))
    assert time.monotonic() - started < 2


def test_relative_url_is_relative_to_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()

    async def body() -> None:
        store = await open_store("sqlite:///data/state.db")
        await store.close()

    run(body)
    assert (tmp_path / "data" / "state.db").exists()


def test_queued_operations_share_one_transaction(tmp_path: Path) -> None:
    path = tmp_path / "state.db"

    async def body() -> None:
        store = await SqliteStore.open(path, timeout=2.0)
        # Another connection holds the lock, so if the writer starts a batch before every caller
        # has queued, the rest queue up behind it: at most two batches, however the loop runs.
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        calls = [asyncio.create_task(store.hit_rate("k", window=60, limit=500)) for _ in range(200)]
        await asyncio.sleep(0.1)
        other.execute("ROLLBACK")
        other.close()
        results = await asyncio.gather(*calls)
        assert sorted(r.count for r in results) == list(range(1, 201))
        stats = store.stats()
        await store.close()
        assert stats.operations == 200
        assert stats.transactions <= 2  # at most: what was queued first, then all the rest
        assert stats.largest_batch >= 100  # so one of them took at least half

        single = await SqliteStore.open(tmp_path / "single.db", max_batch=1)
        await asyncio.gather(*(single.hit_rate("k", window=60, limit=500) for _ in range(50)))
        stats = single.stats()
        await single.close()
        assert (stats.operations, stats.transactions, stats.largest_batch) == (50, 50, 1)

    run(body)


def test_expired_rows_are_absent_at_once_and_swept_later(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    clock = FakeClock()

    async def body() -> None:
        store = await SqliteStore.open(path, clock=clock, sweep_interval=0.05)
        await store.pass_cache_put("a", ttl=10)
        await store.record_outcome("a", "accept", expire=10)
        await store.acquire_slot("a", limit=1, ttl=10)
        await store.hit_rate("a", window=10, limit=1)
        await store.record_tls("a", version=None, expire=10)
        await store.greylist("a", delay=1, expire=10)
        await store.pass_cache_put("b", ttl=100)
        clock.now += 20
        # Absent for every operation before any sweep has run...
        assert not await store.pass_cache_get("a")
        assert await store.reputation("a") is None
        assert await store.tls_history("a") is None
        assert (await store.hit_rate("a", window=10, limit=1)).allowed
        assert (await store.greylist("a", delay=1, expire=10)).first_seen == clock.now
        # ...and deleted by the sweep, which leaves live rows alone.
        deadline = time.monotonic() + 5
        while store.stats().swept < 4 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await store.close()

    run(body)
    remaining = {table: rows(path, f"SELECT key FROM {table}") for table in TABLES}
    assert remaining == {
        "greylist": [("a",)],  # rewritten after expiry above
        "rate": [("a",)],
        "slot": [],
        "reputation": [],
        "tls": [],
        "pass_cache": [("b",)],
    }


def test_a_failing_operation_fails_alone_in_its_batch(tmp_path: Path) -> None:
    path = tmp_path / "state.db"

    async def body() -> None:
        store = await SqliteStore.open(path)
        await store.record_outcome("bad", "accept", expire=60)
        with sqlite3.connect(path) as db:
            db.execute("UPDATE reputation SET counts = 'not json' WHERE key = 'bad'")
        calls = [store.record_outcome("good", "accept", expire=60) for _ in range(20)]
        calls.insert(10, store.record_outcome("bad", "accept", expire=60))
        results = await asyncio.gather(*calls, return_exceptions=True)
        stats = store.stats()
        good = await store.reputation("good")
        await store.close()
        assert isinstance(results[10], StoreError) and "corrupt" in str(results[10])
        assert all(not isinstance(r, BaseException) for i, r in enumerate(results) if i != 10)
        assert good is not None and good.count("accept") == 20
        assert stats.largest_batch > 1  # they did share a batch before being retried alone

    run(body)


def test_the_loop_keeps_running_while_the_writer_waits_for_a_lock(tmp_path: Path) -> None:
    path = tmp_path / "state.db"

    async def body() -> None:
        store = await SqliteStore.open(path, timeout=2.0)
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        loop = asyncio.get_running_loop()
        loop.call_later(0.3, other.execute, "ROLLBACK")
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.create_task(ticker())
        started = time.monotonic()
        await store.pass_cache_put("k", ttl=60)  # waits for the lock on the writer thread
        waited = time.monotonic() - started
        task.cancel()
        other.close()
        await store.close()
        assert waited >= 0.25
        assert ticks >= 10  # the loop was free the whole time

    run(body)


def test_a_caller_cancelled_before_its_batch_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "state.db"

    async def body() -> None:
        store = await SqliteStore.open(path, timeout=2.0)
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        blocked = asyncio.create_task(store.ping())  # the writer waits on the lock with this
        await asyncio.sleep(0.05)
        cancelled = asyncio.create_task(store.pass_cache_put("k", ttl=60))
        await asyncio.sleep(0.01)
        cancelled.cancel()
        other.execute("ROLLBACK")
        other.close()
        await blocked
        assert not await store.pass_cache_get("k")
        await store.close()

    run(body)


def test_close_finishes_what_was_queued_then_refuses(tmp_path: Path) -> None:
    path = tmp_path / "state.db"

    async def body() -> None:
        store = await SqliteStore.open(path)
        tasks = [asyncio.create_task(store.pass_cache_put(f"k{i}", ttl=60)) for i in range(50)]
        await asyncio.sleep(0)  # every task has queued its job
        await store.close()
        await asyncio.gather(*tasks)
        with pytest.raises(StoreError, match="closed"):
            await store.pass_cache_get("k0")

    run(body)
    assert len(rows(path, "SELECT key FROM pass_cache")) == 50
