"""The state store: `open_store(url)` picks the backend; everything else sees `Store`.

Rules this package keeps:
- The checks import `spamkiller.store.base` only (the protocol and its values); the composition
  root calls `open_store` and is the one place that knows which backend runs.
- It imports `errors` and the backends' client libraries (stdlib sqlite3, redis.asyncio), never
  `checks`, `server` or anything above it.
- Open a store in the process that uses it (in each worker after the fork): neither a writer
  thread nor a socket pool survives `fork()`.

URLs (the `state` setting):

    sqlite:///relative/path.db     a file relative to the working directory
    sqlite:////absolute/path.db    four slashes: an absolute path
    redis://[user:password@]host:port/db
    rediss://...                   the same over TLS
    redis-sentinel://[user:password@]host:26379,host:26379/service[/db]
                                   the primary of a Sentinel service, following failovers
    redis-cluster://[user:password@]host:6379,host:6379
                                   a Redis Cluster (startup nodes; database 0 only)
    rediss-sentinel://..., rediss-cluster://...
                                   the same over TLS (every connection)

The Sentinel and Cluster forms are described in spamkiller.store.redis.parse_ha_url.
"""

from __future__ import annotations

from spamkiller.store.base import (
    SCHEMA_VERSION,
    GreylistResult,
    RateResult,
    Reputation,
    SlotLease,
    Store,
    StoreError,
    TlsHistory,
)

# The URL prefixes RedisStore.from_url takes (kept here: checking one must not import redis).
_REDIS_PREFIXES = (
    "redis://",
    "rediss://",
    "redis-sentinel://",
    "rediss-sentinel://",
    "redis-cluster://",
    "rediss-cluster://",
)

__all__ = [
    "SCHEMA_VERSION",
    "GreylistResult",
    "RateResult",
    "Reputation",
    "SlotLease",
    "Store",
    "StoreError",
    "TlsHistory",
    "open_store",
]


async def open_store(
    url: str,
    *,
    timeout: float = 1.0,
    connect_timeout: float | None = None,
) -> Store:
    """Open the store named by `url`.

    `timeout` bounds how long one operation waits on the backend before StoreError: the socket
    timeout for Redis, the wait for another process's write lock for SQLite. `connect_timeout`
    (Redis only; default `timeout`) bounds connecting.

    SQLite opens and migrates the file before returning (StoreError if it cannot), because a
    missing directory or a newer schema is the admin's to fix before the MX starts. Redis does
    not connect until the first operation, so an MX whose Redis is down still starts and each
    check applies its `on_error`. Any other URL: ValueError.
    """
    # Imported here so that a host running SQLite never imports the redis package, and the other
    # way round.
    if url.startswith("sqlite:///"):
        path = url.removeprefix("sqlite:///")
        if not path:
            raise ValueError("sqlite URL without a path: use sqlite:///relative/path.db")
        from spamkiller.store.sqlite import SqliteStore

        return await SqliteStore.open(path, timeout=timeout)
    if url.startswith(_REDIS_PREFIXES):
        from spamkiller.store.redis import RedisStore

        return RedisStore.from_url(url, timeout=timeout, connect_timeout=connect_timeout)
    scheme = url.partition(":")[0] if ":" in url else url
    raise ValueError(
        f"unsupported store URL scheme {scheme!r}: use sqlite:///path, redis://host:port/db,"
        " redis-sentinel://host:26379,host:26379/service, redis-cluster://host:6379,host:6379"
        " (rediss...: the same over TLS)"
    )
