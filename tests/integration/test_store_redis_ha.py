"""The Redis store through Sentinel and Cluster URLs, against real redis-server processes.

Sentinel: a primary, a sentinel monitoring it (quorum 1, down-after 1 s) and, for the failover
test, a replica. Cluster: three primaries joined by `redis-cli --cluster create`. Every store is
opened with `open_store(url)`, as the server does; nothing is mocked. The blocking admin calls
(start, SENTINEL FAILOVER, polling) run in a thread while a store is open, so the store's event
loop keeps reading its sockets as it would in a running MX.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis.crc import key_slot

from spamkiller.store import Store, StoreError, open_store
from spamkiller.store.redis import GREYLIST, RATE, record_key
from support.net import free_port
from support.redis_server import RedisClusterNodes, RedisSentinel, RedisServer, wait_for

SECRET = "s3cret-pw"
TIMEOUT = 0.5  # the stores' timeout
PROMPT = TIMEOUT + 1.0  # "promptly": the timeout plus scheduling slack
T0 = 1_000_000.0  # an injected greylist clock


async def round_trips(store: Store, tag: str) -> None:
    """One pass through every kind of record: each answer must follow the Store contract."""
    first = await store.greylist(f"grey-{tag}", delay=10, expire=60, now=T0)
    assert (first.passed, first.retry_after) == (False, 10)
    again = await store.greylist(f"grey-{tag}", delay=10, expire=60, now=T0 + 11)
    assert again.passed and again.first_seen == T0

    counts = [await store.hit_rate(f"rate-{tag}", window=60, limit=2) for _ in range(3)]
    assert [(r.count, r.allowed) for r in counts] == [(1, True), (2, True), (2, False)]

    lease = await store.acquire_slot(f"slot-{tag}", limit=1, ttl=30)
    assert lease is not None and lease.in_use == 1
    assert await store.acquire_slot(f"slot-{tag}", limit=1, ttl=30) is None
    await store.release_slot(lease)
    assert await store.acquire_slot(f"slot-{tag}", limit=1, ttl=30) is not None

    await store.record_tls(f"tls-{tag}", version="TLSv1.3", expire=60)
    history = await store.raise_tls_floor(f"tls-{tag}", "TLSv1.2", expire=60)
    assert (history.with_tls, history.best_version, history.floor) == (1, "TLSv1.3", "TLSv1.2")
    assert await store.tls_history(f"tls-{tag}") == history

    await store.record_outcome(f"rep-{tag}", "accept", expire=60)
    reputation = await store.reputation(f"rep-{tag}")
    assert reputation is not None and reputation.counts == {"accept": 1}
    await store.pass_cache_put(f"pass-{tag}", ttl=60)
    assert await store.pass_cache_get(f"pass-{tag}")
    await store.ping()


# --- Sentinel ----------------------------------------------------------------------------------


def test_sentinel_url_finds_the_primary_and_keeps_the_contract(tmp_path: Path) -> None:
    with (
        RedisServer(tmp_path / "primary") as primary,
        RedisSentinel(tmp_path / "sentinel", primary.port) as sentinel,
    ):
        # Database 2 of the primary, found through the sentinel (the URL names no data node).
        url = f"redis-sentinel://127.0.0.1:{sentinel.port}/{sentinel.service}/2"

        async def main() -> None:
            store = await open_store(url, timeout=TIMEOUT)
            try:
                await round_trips(store, "s")
            finally:
                await store.close()

        asyncio.run(main())
        keyspace = primary.info("keyspace")
        assert "db2" in keyspace and "db0" not in keyspace, keyspace
        assert primary.command("EXISTS", record_key(RATE, "rate-s")) == 0  # not in db 0


def test_sentinel_url_passwords_for_data_nodes_and_sentinels(tmp_path: Path) -> None:
    with (
        RedisServer(tmp_path / "primary", password=SECRET) as primary,
        RedisSentinel(
            tmp_path / "sentinel", primary.port, password=SECRET, primary_password=SECRET
        ) as sentinel,
    ):
        base = f"redis-sentinel://:{SECRET}@127.0.0.1:{sentinel.port}/{sentinel.service}"

        async def main() -> None:
            # The user part is for the data nodes; these sentinels want it too.
            store = await open_store(f"{base}?sentinel_auth=yes", timeout=TIMEOUT)
            await store.hit_rate("k", window=60, limit=5)
            await store.close()

            unasked = await open_store(base, timeout=TIMEOUT)
            with pytest.raises(StoreError) as caught:
                await unasked.hit_rate("k", window=60, limit=5)
            await unasked.close()
            message = str(caught.value)
            assert f"127.0.0.1:{sentinel.port}" in message and SECRET not in message

        asyncio.run(main())
        assert primary.command("GET", record_key(RATE, "k")) == "1"


def test_sentinel_down_fails_operations_not_the_start() -> None:
    ports = free_port(), free_port()  # nothing listens there

    async def main() -> None:
        url = (
            f"redis-sentinel://u:{SECRET}@127.0.0.1:{ports[0]},127.0.0.1:{ports[1]}/mymaster"
            "?sentinel_auth=yes"
        )
        store = await open_store(url, timeout=TIMEOUT)  # connects to nothing yet
        started = time.monotonic()
        with pytest.raises(StoreError) as caught:
            await store.greylist("k", delay=1, expire=60)
        assert time.monotonic() - started < PROMPT
        message = str(caught.value)
        assert "No master found for 'mymaster'" in message and SECRET not in message
        await store.close()

    asyncio.run(main())


def test_sentinel_failover_is_followed_without_a_restart(tmp_path: Path) -> None:
    """The primary dies, the sentinel promotes the replica, the same store writes there.

    SENTINEL FAILOVER right after the primary stopped skips the down-after wait (a natural
    failover only adds those 1 s). The primary is stopped rather than left running: a demoted
    primary that is still up keeps its clients until the sentinels reconfigure it, about 10 s
    later (docs/store.md, "A planned switchover"), too slow for this suite.
    """
    # No 5 s diskless-sync delay before the replica's first sync.
    fast_sync = ["--repl-diskless-sync-delay", "0"]
    with (
        RedisServer(tmp_path / "primary", extra_args=fast_sync) as primary,
        RedisServer(
            tmp_path / "replica", extra_args=["--replicaof", "127.0.0.1", str(primary.port)]
        ) as replica,
    ):
        wait_for(
            "the replica's link", lambda: replica.info("replication")["master_link_status"] == "up"
        )
        with RedisSentinel(tmp_path / "sentinel", primary.port) as sentinel:
            wait_for(
                "the sentinel to see the replica",
                lambda: [r["flags"] for r in sentinel.replicas()] == ["slave"],
            )

            def fail_over() -> None:
                primary.stop()

                def forced() -> bool:
                    # NOGOODSLAVE until the sentinel has looked at the replica since the stop.
                    return sentinel.command("SENTINEL", "FAILOVER", sentinel.service) == "OK"

                wait_for("SENTINEL FAILOVER to be accepted", forced)
                # Until the sentinel completes the switch, redis-py finds no primary at all.
                wait_for("the switch", lambda: sentinel.primary() == ("127.0.0.1", replica.port))

            async def main() -> None:
                store = await open_store(sentinel.url, timeout=TIMEOUT)
                try:
                    await store.greylist("grey", delay=10, expire=60, now=T0)
                    for _ in range(3):
                        await store.hit_rate("rate", window=60, limit=10)
                    # Replicated before the failover (WAIT), so it survives it.
                    assert primary.command("WAIT", 1, 2000) == 1

                    started = time.monotonic()
                    await asyncio.to_thread(fail_over)
                    failover_took = time.monotonic() - started

                    # The same store object, no restart: the records written before are there.
                    grey = await store.greylist("grey", delay=10, expire=60, now=T0 + 11)
                    assert grey.passed and grey.first_seen == T0
                    rate = await store.hit_rate("rate", window=60, limit=10)
                    assert rate.count == 4
                    await round_trips(store, "after")
                finally:
                    await store.close()
                assert failover_took < 5.0, failover_took

            asyncio.run(main())
            assert replica.info("replication")["role"] == "master"
            assert replica.command("GET", record_key(RATE, "rate")) == "4"


def test_sentinel_outage_mid_failover_raises_store_error_promptly(tmp_path: Path) -> None:
    # Between the primary's death and the switch, every operation fails fast with StoreError
    # (the check's on_error applies) instead of hanging or retrying.
    with (
        RedisServer(tmp_path / "primary") as primary,
        RedisSentinel(tmp_path / "sentinel", primary.port) as sentinel,
    ):

        async def main() -> None:
            store = await open_store(sentinel.url, timeout=TIMEOUT)
            await store.hit_rate("k", window=60, limit=5)
            await asyncio.to_thread(primary.stop)
            for _ in range(2):
                started = time.monotonic()
                with pytest.raises(StoreError):
                    await store.hit_rate("k", window=60, limit=5)
                assert time.monotonic() - started < PROMPT
            await asyncio.to_thread(primary.start)
            await store.hit_rate("k", window=60, limit=5)  # the same primary is back
            await store.close()

        asyncio.run(main())


# --- Cluster -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterNodes]:
    with RedisClusterNodes(tmp_path_factory.mktemp("cluster"), 3, password=SECRET) as nodes:
        yield nodes


def cluster_url(cluster: RedisClusterNodes) -> str:
    return cluster.url.replace("redis-cluster://", f"redis-cluster://:{SECRET}@")


def test_cluster_url_keeps_the_contract_with_keys_on_every_node(
    cluster: RedisClusterNodes,
) -> None:
    async def main() -> None:
        store = await open_store(cluster_url(cluster), timeout=TIMEOUT)
        try:
            await round_trips(store, "c")
            for index in range(60):
                await store.greylist(f"spread-{index}", delay=10, expire=60)
        finally:
            await store.close()

    asyncio.run(main())
    sizes = [node.command("DBSIZE") for node in cluster.nodes]
    assert sum(1 for size in sizes if size > 0) >= 2, sizes
    # Each record sits on the node that owns its slot: asked there, the slot holds the key.
    owner_counts = []
    for index in range(60):
        key = record_key(GREYLIST, f"spread-{index}")
        slot = key_slot(key.encode())
        owner_counts.append(
            sum(node.command("CLUSTER", "COUNTKEYSINSLOT", slot) > 0 for node in cluster.nodes)
        )
    assert set(owner_counts) == {1}


def test_cluster_concurrent_first_calls_are_routed_by_slot(cluster: RedisClusterNodes) -> None:
    # Regression: redis-py sends keyed commands that start before it knows the slot map to a
    # random node, and by default every 5th MOVED closed every connection mid-flight: most of
    # these calls failed. The store learns the map first and turns that reset off.
    async def main() -> None:
        store = await open_store(cluster_url(cluster), timeout=2.0)  # a loaded CI machine
        try:
            results = await asyncio.gather(
                *(store.greylist(f"first-{index}", delay=1, expire=60) for index in range(64)),
                return_exceptions=True,
            )
        finally:
            await store.close()
        failed = [result for result in results if isinstance(result, BaseException)]
        assert not failed, failed[:3]

    asyncio.run(main())


def test_cluster_counts_stay_exact_from_two_stores(cluster: RedisClusterNodes) -> None:
    async def main() -> None:
        # This test is about counting, not latency: 100 calls per store queue behind 16 in
        # flight, which on a busy machine can take longer than TIMEOUT.
        stores = [await open_store(cluster_url(cluster), timeout=10.0) for _ in range(2)]
        for store in stores:
            await store.ping()  # learn the slot map first
        try:
            results = await asyncio.gather(
                *(
                    stores[index % 2].hit_rate(f"busy-{index % 4}", window=60, limit=20)
                    for index in range(200)
                )
            )
        finally:
            for store in stores:
                await store.close()
        allowed = [sum(r.allowed for i, r in enumerate(results) if i % 4 == k) for k in range(4)]
        assert allowed == [20, 20, 20, 20]

    asyncio.run(main())


def test_cluster_down_fails_operations_not_the_start() -> None:
    ports = free_port(), free_port()

    async def main() -> None:
        url = f"redis-cluster://:{SECRET}@127.0.0.1:{ports[0]},127.0.0.1:{ports[1]}"
        store = await open_store(url, timeout=TIMEOUT)
        for _ in range(2):
            started = time.monotonic()
            with pytest.raises(StoreError) as caught:
                await store.hit_rate("k", window=60, limit=5)
            assert time.monotonic() - started < PROMPT
            message = str(caught.value)
            assert f"127.0.0.1:{ports[0]}" in message and SECRET not in message
        await store.close()

    asyncio.run(main())


def test_cluster_hung_node_costs_concurrent_callers_one_timeout(tmp_path: Path) -> None:
    # The only startup node accepts connections but never answers (SIGSTOP). The callers that
    # arrive while the store asks it for the slot map share that one attempt: all fail after
    # one timeout, not one timeout per caller queued ahead.
    with RedisServer(tmp_path / "hung") as hung:
        hung.pause()

        async def main() -> None:
            store = await open_store(f"redis-cluster://127.0.0.1:{hung.port}", timeout=TIMEOUT)
            started = time.monotonic()
            results = await asyncio.gather(
                *(store.hit_rate(f"k{index}", window=60, limit=5) for index in range(8)),
                return_exceptions=True,
            )
            elapsed = time.monotonic() - started
            await store.close()
            assert all(isinstance(result, StoreError) for result in results), results
            assert elapsed < PROMPT, elapsed

        asyncio.run(main())


def test_cluster_wrong_password_is_a_store_error_without_the_password(
    cluster: RedisClusterNodes,
) -> None:
    async def main() -> None:
        store = await open_store(cluster_url(cluster).replace(SECRET, "wrong-pw"), timeout=TIMEOUT)
        with pytest.raises(StoreError) as caught:
            await store.ping()
        assert "wrong-pw" not in str(caught.value)
        await store.close()

    asyncio.run(main())
