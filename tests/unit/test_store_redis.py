"""What only the Redis store promises: key names, record formats and TTLs in the server,
Cluster hash slots, script reloading, bounded connections, and errors that hide passwords.
Runs against a real redis-server started for this module.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis.crc import key_slot

from spamkiller.store import StoreError, open_store
from spamkiller.store.redis import (
    GREYLIST,
    PASS_CACHE,
    RATE,
    REPUTATION,
    SLOT,
    TLS,
    RedisStore,
    record_key,
)
from support.net import free_port
from support.redis_server import RedisServer

KINDS = (GREYLIST, RATE, SLOT, REPUTATION, TLS, PASS_CACHE)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as srv:
        yield srv


@pytest.fixture()
def url(server: RedisServer) -> str:
    server.flush()
    return server.url


def run(url: str, body: Callable[[RedisStore, Redis], Awaitable[None]]) -> None:
    """`body(store, raw)`: a store on `url` and a plain client to look at what it wrote."""

    async def main() -> None:
        store = RedisStore.from_url(url)
        raw = Redis.from_url(url)
        try:
            await body(store, raw)
        finally:
            await store.close()
            await raw.aclose()

    asyncio.run(main())


def test_key_names_are_versioned_with_the_key_as_hash_tag() -> None:
    assert record_key(GREYLIST, "192.0.2.0/24|a@b.example|c@d.example") == (
        "sk:v1:grey:{192.0.2.0/24|a@b.example|c@d.example}"
    )
    assert record_key(RATE, "2001:db8::/64") == "sk:v1:rate:{2001:db8::/64}"
    # Braces would end the hash tag early; %, space and non-ASCII are escaped to stay exact.
    assert record_key(TLS, "a{b}c") == "sk:v1:tls:{a%7Bb%7Dc}"
    assert record_key(TLS, "50% é") == "sk:v1:tls:{50%25%20%C3%A9}"


@pytest.mark.parametrize("key", ["198.51.100.7", "a{b}c", "}{", "{}", "é|x@y"])
def test_every_record_of_a_key_lands_in_one_cluster_slot(key: str) -> None:
    slots = {key_slot(record_key(kind, key).encode()) for kind in KINDS}
    assert len(slots) == 1


def test_records_have_the_documented_format_and_a_ttl_in_the_server(url: str) -> None:
    async def body(store: RedisStore, raw: Redis) -> None:
        await store.greylist("g", delay=10, expire=100, retry_window=50, now=1000.0)
        await store.hit_rate("r", window=60, limit=5, cost=2)
        lease = await store.acquire_slot("s", limit=3, ttl=30)
        await store.record_outcome("o", "accept", expire=90)
        await store.record_tls("t", version="TLSv1.3", expire=120)
        await store.raise_tls_floor("t", "TLSv1.2", expire=120)
        await store.pass_cache_put("p", ttl=40)
        names = sorted(k.decode() if isinstance(k, bytes) else k for k in await raw.keys("*"))
        assert names == sorted(
            [
                "sk:v1:grey:{g}",
                "sk:v1:rate:{r}",
                "sk:v1:slot:{s}",
                "sk:v1:rep:{o}",
                "sk:v1:tls:{t}",
                "sk:v1:pass:{p}",
            ]
        )
        assert await raw.hgetall("sk:v1:grey:{g}") == {b"first": b"1000000", b"exp": b"1050000"}
        assert await raw.get("sk:v1:rate:{r}") == b"2"
        assert lease is not None
        assert await raw.zrange("sk:v1:slot:{s}", 0, -1) == [lease.token.encode()]
        rep = await raw.hgetall("sk:v1:rep:{o}")
        assert set(rep) == {b"first", b"last", b"n:accept"} and rep[b"n:accept"] == b"1"
        assert int(rep[b"first"]) == pytest.approx(time.time() * 1000, abs=5000)
        tls = await raw.hgetall("sk:v1:tls:{t}")
        assert {k: v for k, v in tls.items() if k not in (b"first", b"last")} == {
            b"tls": b"1",
            b"best": b"5",
            b"floor": b"4",
        }
        assert await raw.get("sk:v1:pass:{p}") == b"1"
        ttls = {name: await raw.pttl(name) for name in names}
        expected = {
            "sk:v1:grey:{g}": 50_000,
            "sk:v1:rate:{r}": 60_000,
            "sk:v1:slot:{s}": 30_000,
            "sk:v1:rep:{o}": 90_000,
            "sk:v1:tls:{t}": 120_000,
            "sk:v1:pass:{p}": 40_000,
        }
        for name, ttl in ttls.items():
            assert expected[name] - 2000 < ttl <= expected[name], name

    run(url, body)


def test_scripts_come_back_after_the_server_forgets_them(url: str) -> None:
    async def body(store: RedisStore, raw: Redis) -> None:
        assert (await store.hit_rate("r", window=60, limit=5)).count == 1
        await raw.script_flush()  # what a restart or failover does to the script cache
        assert (await store.hit_rate("r", window=60, limit=5)).count == 2

    run(url, body)


def test_callers_beyond_the_connection_limit_wait_their_turn(url: str) -> None:
    # 32 callers in tight loops on 2 connections: every caller gets its turn within the timeout
    # (a pool that let the releasing caller take its connection straight back starved others).
    async def main() -> None:
        store = RedisStore.from_url(url, max_connections=2, timeout=0.5)
        raw = Redis.from_url(url)
        # Long enough to starve: redis-py's BlockingConnectionPool failed this within 1.5 s.
        deadline = time.monotonic() + 1.5
        done = 0

        async def caller() -> None:
            nonlocal done
            while time.monotonic() < deadline:
                await store.hit_rate("r", window=60, limit=10**9)
                done += 1

        try:
            await asyncio.gather(*(caller() for _ in range(32)))
            assert (await store.hit_rate("r", window=60, limit=10**9)).count == done + 1
            assert len(await raw.client_list()) <= 3  # the store's 2, plus `raw`
        finally:
            await store.close()
            await raw.aclose()

    asyncio.run(main())


def test_a_client_made_elsewhere_works_and_stays_open(url: str) -> None:
    # The Sentinel and Cluster path: the caller builds the client, the store only uses it.
    async def main() -> None:
        client = Redis.from_url(url, decode_responses=True)
        store = RedisStore(client, owns_client=False)
        await store.record_outcome("o", "accept", expire=60)
        await store.record_tls("t", version="TLSv1.2", expire=60)
        record = await store.reputation("o")
        history = await store.tls_history("t")
        assert record is not None and record.count("accept") == 1
        assert history is not None and history.best_version == "TLSv1.2"
        await store.close()
        assert await client.ping()  # not ours to close
        await client.aclose()

    asyncio.run(main())


def test_redis_down_from_the_start_fails_operations_not_the_start(tmp_path: Path) -> None:
    port = free_port()  # nothing listens here

    async def main() -> None:
        secret = await open_store(f"redis://user:s3cret-pw@127.0.0.1:{port}/0", timeout=0.5)
        started = time.monotonic()
        with pytest.raises(StoreError) as caught:
            await secret.greylist("k", delay=1, expire=60)
        assert time.monotonic() - started < 1.0
        message = str(caught.value)
        assert f"127.0.0.1:{port}" in message and "s3cret-pw" not in message
        await secret.close()

        store = await open_store(f"redis://127.0.0.1:{port}/0", timeout=0.5)
        with pytest.raises(StoreError):
            await store.ping()
        with RedisServer(tmp_path / "late", port=port):
            await store.ping()  # the same store object works once Redis is up
        await store.close()

    asyncio.run(main())


def test_corrupt_records_are_store_errors(url: str) -> None:
    async def body(store: RedisStore, raw: Redis) -> None:
        await raw.hset("sk:v1:rep:{x}", mapping={"last": "1"})  # no "first"
        with pytest.raises(StoreError, match="corrupt reputation record"):
            await store.reputation("x")
        await raw.hset("sk:v1:tls:{x}", mapping={"first": "1", "last": "1", "best": "99"})
        with pytest.raises(StoreError, match="unknown to this version"):
            await store.tls_history("x")
        await raw.set("sk:v1:grey:{x}", "not a hash")
        with pytest.raises(StoreError, match="WRONGTYPE"):
            await store.greylist("x", delay=1, expire=60)

    run(url, body)


def test_a_restart_while_idle_costs_no_failed_operation(tmp_path: Path) -> None:
    # The pool's connection died with the old server. The event loop saw its EOF while it ran
    # (the stop and start happen off the loop here, as in production), so the pool replaces the
    # connection before sending: the first operation afterwards succeeds, with no retry of ours.
    server = RedisServer(tmp_path / "redis").start()
    try:

        async def main() -> None:
            store = RedisStore.from_url(server.url, max_connections=1, timeout=0.5)
            assert (await store.hit_rate("r", window=60, limit=5)).count == 1
            await asyncio.to_thread(server.stop)
            await asyncio.to_thread(server.start)
            assert (await store.hit_rate("r", window=60, limit=5)).count == 1  # a new server
            await store.close()

        asyncio.run(main())
    finally:
        server.stop()
