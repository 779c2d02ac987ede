"""The Store contract: every test here runs unchanged against SQLite and a real redis-server.

A test states one rule of spamkiller.store.base and checks it through `open_store(url)` only, so a
backend passes when it keeps the same rules, not when it has the same insides. Expiry uses real
TTLs of 0.2 s (one short sleep) or the greylist's injected `now`; concurrency uses two Store
instances on one backend (two writer threads on one file, two connection pools on one server);
failure stops, pauses or locks the backend and expects StoreError promptly, then recovery.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from spamkiller.store import (
    GreylistResult,
    RateResult,
    Store,
    StoreError,
    open_store,
)
from support.redis_server import RedisServer

EXPIRE = 0.2  # a TTL that runs out within one short sleep
PAST_EXPIRY = 0.3  # the sleep: EXPIRE plus slack for a loaded machine
OUTAGE_TIMEOUT = 0.3  # the store's timeout in failure tests
PROMPT = OUTAGE_TIMEOUT + 1.0  # "promptly": the timeout plus scheduling slack
T0 = 1_000_000.0  # an injected clock, far from real time on purpose

Body = Callable[..., Awaitable[None]]


@dataclass
class Backend:
    """One backend under test: how to open it, and how to make it fail for a while."""

    name: str
    url: str
    outage: Callable[[str], contextlib.AbstractContextManager[None]]

    async def open(self, **options: Any) -> Store:
        return await open_store(self.url, **options)

    def run(self, body: Body, *, stores: int = 1, **options: Any) -> None:
        """Run `body(store, ...)` with `stores` fresh Store instances on this backend."""

        async def main() -> None:
            opened = [await self.open(**options) for _ in range(stores)]
            try:
                await body(*opened)
            finally:
                for store in opened:
                    await store.close()

        asyncio.run(main())


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(params=["sqlite", "redis"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "sqlite":
        path = tmp_path / "state.db"

        @contextlib.contextmanager
        def locked(kind: str) -> Iterator[None]:
            # Another process holding the write lock: every transaction waits, then fails.
            other = sqlite3.connect(path, isolation_level=None)
            other.execute("BEGIN IMMEDIATE")
            try:
                yield
            finally:
                other.execute("ROLLBACK")
                other.close()

        return Backend("sqlite", f"sqlite:///{path}", locked)

    server: RedisServer = request.getfixturevalue("redis_server")
    server.flush()

    @contextlib.contextmanager
    def outage(kind: str) -> Iterator[None]:
        if kind == "hung":
            server.pause()  # connections stay open, nothing answers
            try:
                yield
            finally:
                server.resume()
            return
        server.stop()  # connections refused
        try:
            yield
        finally:
            server.start()

    return Backend("redis", server.url, outage)


def near_now(value: float) -> bool:
    return abs(value - time.time()) < 2.0


# --- greylist ----------------------------------------------------------------------------------


def test_greylist_first_sight_is_recorded_and_told_to_wait(backend: Backend) -> None:
    async def body(store: Store) -> None:
        result = await store.greylist(
            "192.0.2.0/24|a@b.example|c@d.example", delay=300, expire=3600
        )
        assert isinstance(result, GreylistResult)
        assert not result.passed
        assert result.retry_after == pytest.approx(300)
        assert near_now(result.first_seen)

    backend.run(body)


def test_greylist_early_retry_waits_and_keeps_the_first_sight(backend: Backend) -> None:
    async def body(store: Store) -> None:
        await store.greylist("k", delay=10, expire=100, now=T0)
        early = await store.greylist("k", delay=10, expire=100, now=T0 + 4)
        assert early == GreylistResult(first_seen=T0, passed=False, retry_after=6)
        again = await store.greylist("k", delay=10, expire=100, now=T0 + 9.5)
        assert again == GreylistResult(first_seen=T0, passed=False, retry_after=0.5)

    backend.run(body)


def test_greylist_retry_after_delay_passes_and_keeps_passing(backend: Backend) -> None:
    async def body(store: Store) -> None:
        await store.greylist("k", delay=10, expire=100, now=T0)
        assert await store.greylist("k", delay=10, expire=100, now=T0 + 10) == GreylistResult(
            first_seen=T0, passed=True, retry_after=0
        )
        # Each pass extends the record to `expire` from that pass.
        for at in (T0 + 100, T0 + 190, T0 + 280):
            result = await store.greylist("k", delay=10, expire=100, now=at)
            assert result.passed and result.first_seen == T0

    backend.run(body)


def test_greylist_pending_record_lives_for_the_retry_window(backend: Backend) -> None:
    async def body(store: Store) -> None:
        await store.greylist("k", delay=10, retry_window=50, expire=1000, now=T0)
        # Past the retry window the first sight is forgotten: this is a new first sight.
        late = await store.greylist("k", delay=10, retry_window=50, expire=1000, now=T0 + 50)
        assert late == GreylistResult(first_seen=T0 + 50, passed=False, retry_after=10)
        # Inside it (counted from the new first sight) a retry passes.
        ok = await store.greylist("k", delay=10, retry_window=50, expire=1000, now=T0 + 61)
        assert ok == GreylistResult(first_seen=T0 + 50, passed=True, retry_after=0)

    backend.run(body)


def test_greylist_passed_record_expires_expire_after_its_last_pass(backend: Backend) -> None:
    async def body(store: Store) -> None:
        await store.greylist("k", delay=10, retry_window=20, expire=100, now=T0)
        assert (
            await store.greylist("k", delay=10, retry_window=20, expire=100, now=T0 + 15)
        ).passed
        gone = await store.greylist("k", delay=10, retry_window=20, expire=100, now=T0 + 115)
        assert gone == GreylistResult(first_seen=T0 + 115, passed=False, retry_after=10)

    backend.run(body)


def test_greylist_records_expire_in_real_time(backend: Backend) -> None:
    async def body(store: Store) -> None:
        first = await store.greylist("k", delay=0.05, expire=EXPIRE)
        await asyncio.sleep(PAST_EXPIRY)
        # Past the delay, but the pending record is gone: a first sight again, not a pass.
        again = await store.greylist("k", delay=0.05, expire=EXPIRE)
        assert not again.passed
        assert again.first_seen > first.first_seen

    backend.run(body)


def test_greylist_zero_delay_passes_on_the_first_retry(backend: Backend) -> None:
    async def body(store: Store) -> None:
        assert not (await store.greylist("k", delay=0, expire=60, now=T0)).passed
        assert (await store.greylist("k", delay=0, expire=60, now=T0)).passed

    backend.run(body)


def test_greylist_concurrent_first_sights_record_one(backend: Backend) -> None:
    async def body(a: Store, b: Store) -> None:
        results = await asyncio.gather(
            *(s.greylist("k", delay=300, expire=3600) for s in (a, b) * 25)
        )
        assert not any(r.passed for r in results)
        assert len({r.first_seen for r in results}) == 1

    backend.run(body, stores=2)


def test_keys_are_kept_apart_exactly(backend: Backend) -> None:
    # Keys that an escaping scheme could confuse: braces (the Redis hash tag), the escape
    # character, spaces, non-ASCII, and their escaped spellings.
    keys = ["a{b}", "a%7Bb%7D", "a b", "a%20b", "é", "%C3%A9", "}{", "{}", "x" * 1024]

    async def body(store: Store) -> None:
        for index, key in enumerate(keys):
            result = await store.greylist(key, delay=10, expire=60, now=T0 + index)
            assert result.first_seen == T0 + index, key
            await store.pass_cache_put(key, ttl=60)
        for index, key in enumerate(keys):
            result = await store.greylist(key, delay=10, expire=60, now=T0 + 20)
            assert result.first_seen == T0 + index, key
            assert await store.pass_cache_get(key)
        assert not await store.pass_cache_get("a")

    backend.run(body)


# --- hit_rate ------------------------------------------------------------------------------------


def test_rate_allows_up_to_limit_then_denies_without_counting(backend: Backend) -> None:
    async def body(store: Store) -> None:
        results = [await store.hit_rate("ip", window=60, limit=3) for _ in range(5)]
        assert [(r.count, r.allowed) for r in results] == [
            (1, True),
            (2, True),
            (3, True),
            (3, False),
            (3, False),
        ]
        assert all(isinstance(r, RateResult) for r in results)
        assert 59 < results[0].reset_after <= 60
        assert 0 < results[-1].reset_after <= results[0].reset_after

    backend.run(body)


def test_rate_cost_counts_as_that_many_hits(backend: Backend) -> None:
    async def body(store: Store) -> None:
        counts = [
            (r.count, r.allowed)
            for r in [
                await store.hit_rate("ip", window=60, limit=5, cost=2),
                await store.hit_rate("ip", window=60, limit=5, cost=2),
                await store.hit_rate("ip", window=60, limit=5, cost=2),
                await store.hit_rate("ip", window=60, limit=5, cost=1),
            ]
        ]
        assert counts == [(2, True), (4, True), (4, False), (5, True)]
        # More than the limit at once is never allowed, and opens no window.
        too_big = await store.hit_rate("other", window=60, limit=5, cost=6)
        assert (too_big.count, too_big.allowed) == (0, False)
        assert too_big.reset_after == pytest.approx(60)

    backend.run(body)


def test_rate_window_ends_and_counting_starts_again(backend: Backend) -> None:
    async def body(store: Store) -> None:
        assert (await store.hit_rate("ip", window=EXPIRE, limit=1)).allowed
        denied = await store.hit_rate("ip", window=EXPIRE, limit=1)
        assert not denied.allowed
        assert 0 < denied.reset_after <= EXPIRE
        await asyncio.sleep(PAST_EXPIRY)
        again = await store.hit_rate("ip", window=EXPIRE, limit=1)
        assert (again.count, again.allowed) == (1, True)

    backend.run(body)


def test_rate_is_exact_under_concurrency_from_two_stores(backend: Backend) -> None:
    async def body(a: Store, b: Store) -> None:
        results = await asyncio.gather(
            *(s.hit_rate("net", window=60, limit=50) for s in (a, b) * 100)
        )
        allowed = [r for r in results if r.allowed]
        assert len(allowed) == 50
        assert sorted(r.count for r in allowed) == list(range(1, 51))
        assert all(r.count == 50 for r in results if not r.allowed)

    backend.run(body, stores=2)


# --- slots ----------------------------------------------------------------------------------------


def test_slots_are_capped_and_released(backend: Backend) -> None:
    async def body(store: Store) -> None:
        first = await store.acquire_slot("ip", limit=2, ttl=60)
        second = await store.acquire_slot("ip", limit=2, ttl=60)
        assert first is not None and second is not None
        assert (first.in_use, second.in_use) == (1, 2)
        assert first.token != second.token
        assert await store.acquire_slot("ip", limit=2, ttl=60) is None
        await store.release_slot(first)
        await store.release_slot(first)  # twice: harmless, frees nothing more
        third = await store.acquire_slot("ip", limit=2, ttl=60)
        assert third is not None and third.in_use == 2
        assert await store.acquire_slot("ip", limit=2, ttl=60) is None
        assert await store.acquire_slot("other", limit=2, ttl=60) is not None

    backend.run(body)


def test_slots_of_a_crashed_worker_expire_while_the_key_stays_busy(backend: Backend) -> None:
    async def body(store: Store) -> None:
        held = await store.acquire_slot("ip", limit=2, ttl=60)  # a live session
        lost = await store.acquire_slot("ip", limit=2, ttl=EXPIRE)  # never released
        assert held is not None and lost is not None
        assert await store.acquire_slot("ip", limit=2, ttl=60) is None
        await asyncio.sleep(PAST_EXPIRY)
        back = await store.acquire_slot("ip", limit=2, ttl=60)
        assert back is not None and back.in_use == 2
        await store.release_slot(lost)  # after expiry: harmless
        assert await store.acquire_slot("ip", limit=2, ttl=60) is None

    backend.run(body)


def test_slots_are_exact_under_concurrency_from_two_stores(backend: Backend) -> None:
    async def body(a: Store, b: Store) -> None:
        leases = await asyncio.gather(
            *(s.acquire_slot("net", limit=10, ttl=60) for s in (a, b) * 50)
        )
        held = [lease for lease in leases if lease is not None]
        assert len(held) == 10
        assert sorted(lease.in_use for lease in held) == list(range(1, 11))
        await asyncio.gather(*(a.release_slot(lease) for lease in held))
        assert (await b.acquire_slot("net", limit=10, ttl=60)) is not None

    backend.run(body, stores=2)


# --- reputation ----------------------------------------------------------------------------------


def test_reputation_counts_outcomes_with_first_and_last_seen(backend: Backend) -> None:
    async def body(store: Store) -> None:
        assert await store.reputation("ip") is None
        one = await store.record_outcome("ip", "accept", expire=60)
        assert dict(one.counts) == {"accept": 1}
        assert one.first_seen == one.last_seen and near_now(one.first_seen)
        await asyncio.sleep(0.01)
        await store.record_outcome("ip", "accept", expire=60)
        three = await store.record_outcome("ip", "reject", expire=60)
        assert dict(three.counts) == {"accept": 2, "reject": 1}
        assert three.count("accept") == 2 and three.count("spam") == 0
        assert three.first_seen == one.first_seen
        assert three.last_seen > three.first_seen
        assert await store.reputation("ip") == three
        assert await store.reputation("other") is None

    backend.run(body)


def test_reputation_expires_and_a_shorter_expire_never_cuts_it(backend: Backend) -> None:
    async def body(store: Store) -> None:
        await store.record_outcome("short", "accept", expire=EXPIRE)
        await store.record_outcome("long", "accept", expire=60)
        await store.record_outcome("long", "reject", expire=EXPIRE)
        await asyncio.sleep(PAST_EXPIRY)
        assert await store.reputation("short") is None
        kept = await store.reputation("long")
        assert kept is not None and dict(kept.counts) == {"accept": 1, "reject": 1}
        # An expired record starts again from nothing.
        fresh = await store.record_outcome("short", "reject", expire=60)
        assert dict(fresh.counts) == {"reject": 1}

    backend.run(body)


def test_reputation_counts_exactly_under_concurrency(backend: Backend) -> None:
    async def body(a: Store, b: Store) -> None:
        await asyncio.gather(*(s.record_outcome("ip", "accept", expire=60) for s in (a, b) * 50))
        record = await a.reputation("ip")
        assert record is not None and dict(record.counts) == {"accept": 100}

    backend.run(body, stores=2)


# --- TLS history ---------------------------------------------------------------------------------


def test_tls_history_counts_sessions_and_keeps_the_best_version(backend: Backend) -> None:
    async def body(store: Store) -> None:
        assert await store.tls_history("mx.example") is None
        await store.record_tls("mx.example", version="TLSv1.2", expire=60)
        await store.record_tls("mx.example", version="TLSv1.3", expire=60)
        last = await store.record_tls("mx.example", version="TLSv1.2", expire=60)
        plain = await store.record_tls("mx.example", version=None, expire=60)
        assert (last.with_tls, last.without_tls, last.best_version) == (3, 0, "TLSv1.3")
        assert (plain.with_tls, plain.without_tls, plain.best_version) == (3, 1, "TLSv1.3")
        assert plain.floor is None
        assert near_now(plain.first_seen) and plain.last_seen >= plain.first_seen
        assert await store.tls_history("mx.example") == plain

    backend.run(body)


def test_tls_floor_only_rises_and_comes_back_with_each_session(backend: Backend) -> None:
    async def body(store: Store) -> None:
        raised = await store.raise_tls_floor("mx.example", "TLSv1.2", expire=60)
        assert raised.floor == "TLSv1.2"
        assert (raised.with_tls, raised.without_tls, raised.best_version) == (0, 0, None)
        assert (await store.raise_tls_floor("mx.example", "TLSv1", expire=60)).floor == "TLSv1.2"
        assert (await store.raise_tls_floor("mx.example", "TLSv1.3", expire=60)).floor == "TLSv1.3"
        # A session reports the floor in the same round trip: a downgrade is visible at once.
        session = await store.record_tls("mx.example", version="TLSv1.2", expire=60)
        assert session.floor == "TLSv1.3" and session.best_version == "TLSv1.2"

    backend.run(body)


def test_tls_history_expires(backend: Backend) -> None:
    async def body(store: Store) -> None:
        await store.record_tls("short", version="TLSv1.3", expire=EXPIRE)
        await store.raise_tls_floor("short", "TLSv1.3", expire=EXPIRE)
        await store.raise_tls_floor("long", "TLSv1.3", expire=60)
        await store.record_tls("long", version=None, expire=EXPIRE)  # does not cut its life
        await asyncio.sleep(PAST_EXPIRY)
        assert await store.tls_history("short") is None
        kept = await store.tls_history("long")
        assert kept is not None and kept.floor == "TLSv1.3" and kept.without_tls == 1

    backend.run(body)


# --- pass cache ----------------------------------------------------------------------------------


def test_pass_cache_holds_a_key_for_its_ttl(backend: Backend) -> None:
    async def body(store: Store) -> None:
        assert not await store.pass_cache_get("198.51.100.7")
        await store.pass_cache_put("198.51.100.7", ttl=EXPIRE)
        await store.pass_cache_put("198.51.100.8", ttl=60)
        await store.pass_cache_put("198.51.100.9", ttl=60)
        await store.pass_cache_put("198.51.100.9", ttl=EXPIRE)  # a new put replaces the TTL
        assert await store.pass_cache_get("198.51.100.7")
        await asyncio.sleep(PAST_EXPIRY)
        assert not await store.pass_cache_get("198.51.100.7")
        assert await store.pass_cache_get("198.51.100.8")
        assert not await store.pass_cache_get("198.51.100.9")

    backend.run(body)


# --- arguments, lifecycle, failure ---------------------------------------------------------------

BAD_CALLS: list[tuple[str, Callable[[Store], Awaitable[object]]]] = [
    ("empty key", lambda s: s.pass_cache_get("")),
    ("long key", lambda s: s.pass_cache_get("x" * 1025)),
    ("control in key", lambda s: s.pass_cache_get("a\r\nb")),
    ("lone surrogate in key", lambda s: s.pass_cache_put("a\udcffb", ttl=1)),
    ("negative delay", lambda s: s.greylist("k", delay=-1, expire=60)),
    ("delay beyond window", lambda s: s.greylist("k", delay=60, expire=60)),
    ("zero expire", lambda s: s.greylist("k", delay=1, expire=0)),
    ("nan now", lambda s: s.greylist("k", delay=1, expire=60, now=float("nan"))),
    ("zero window", lambda s: s.hit_rate("k", window=0, limit=1)),
    ("zero limit", lambda s: s.hit_rate("k", window=1, limit=0)),
    ("zero cost", lambda s: s.hit_rate("k", window=1, limit=1, cost=0)),
    ("float limit", lambda s: s.acquire_slot("k", limit=1.5, ttl=1)),  # type: ignore[arg-type]
    ("inf ttl", lambda s: s.acquire_slot("k", limit=1, ttl=float("inf"))),
    ("bad outcome", lambda s: s.record_outcome("k", "Accept!", expire=1)),
    ("unknown TLS", lambda s: s.record_tls("k", version="TLSv2", expire=1)),
    ("None floor", lambda s: s.raise_tls_floor("k", None, expire=1)),  # type: ignore[arg-type]
    ("zero pass ttl", lambda s: s.pass_cache_put("k", ttl=0)),
]


@pytest.mark.parametrize("call", [c for _, c in BAD_CALLS], ids=[n for n, _ in BAD_CALLS])
def test_wrong_arguments_are_value_errors(
    backend: Backend, call: Callable[[Store], Awaitable[object]]
) -> None:
    async def body(store: Store) -> None:
        with pytest.raises(ValueError):
            await call(store)

    backend.run(body)


def test_ping_close_and_closed_store(backend: Backend) -> None:
    async def body(store: Store) -> None:
        assert isinstance(store, Store)
        await store.ping()
        await store.close()
        await store.close()  # twice: harmless
        with pytest.raises(StoreError):
            await store.ping()
        with pytest.raises(StoreError):
            await store.hit_rate("k", window=1, limit=1)

    backend.run(body)


@pytest.mark.parametrize("kind", ["down", "hung"])
def test_backend_outage_raises_store_error_promptly_then_recovers(
    backend: Backend, kind: str
) -> None:
    async def body(store: Store) -> None:
        assert (await store.hit_rate("ip", window=60, limit=10)).allowed
        with backend.outage(kind):
            for _ in range(2):  # and again: no slow retry loop on the second failure
                started = time.monotonic()
                with pytest.raises(StoreError):
                    await store.hit_rate("ip", window=60, limit=10)
                assert time.monotonic() - started < PROMPT
            # Many callers at once: each fails promptly, none waits behind the others' timeouts.
            started = time.monotonic()
            results = await asyncio.gather(
                *(store.greylist(f"k{i}", delay=1, expire=60) for i in range(20)),
                return_exceptions=True,
            )
            assert all(isinstance(r, StoreError) for r in results), results
            assert time.monotonic() - started < PROMPT + OUTAGE_TIMEOUT
        # Back: the same store object works again, at the first operation.
        result = await store.hit_rate("ip2", window=60, limit=10)
        assert (result.count, result.allowed) == (1, True)
        await store.ping()

    backend.run(body, timeout=OUTAGE_TIMEOUT)
