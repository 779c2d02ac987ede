"""The shared Store: Redis or Valkey through redis.asyncio, for several MX hosts.

Rules this module keeps:
- Every operation is one Lua script or one single command, so it is atomic on the server however
  many hosts and workers race on a key. Scripts are registered once per store (`register_script`:
  EVALSHA, with the script sent again after a server restart emptied its cache).
- Each script touches exactly one key, named in KEYS. Key names are `sk:v1:<kind>:{<key>}`:
  versioned by the schema, and the caller's key is the Redis Cluster hash tag, so every record of
  one key (its greylist, rate and TLS records) lives in one slot and a future script may touch
  several of them. Characters that would end the tag early or are unprintable (`{`, `}`, `%`,
  space, controls, non-ASCII) are %-escaped, which keeps distinct keys distinct.
- TTLs live in the server (`PEXPIRE`, `SET ... PX`); time inside scripts is the server's `TIME`,
  so every MX host judges expiry by one clock. Records hold milliseconds.
- No client-side retries (`Retry(NoBackoff(), 0)`): a retried script could apply twice (a hit
  counted twice), and a retry loop turns "Redis is down" into a slow answer. A stale pooled
  connection after a server restart is replaced by the pool before use, without a retry (this
  needs RESP2, see from_url).
- At most `max_in_flight` operations per store are on the wire; later callers wait their turn in
  arrival order (a FIFO semaphore). Connecting, every reply and the wait for a turn are each
  bounded by `timeout`; any Redis or socket failure becomes StoreError. Passwords never appear
  in error messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Final
from urllib.parse import urlsplit

from redis.asyncio import ConnectionPool, Redis, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from spamkiller.store.base import (
    KEY_PREFIX,
    GreylistResult,
    RateResult,
    Reputation,
    SlotLease,
    StoreError,
    TlsHistory,
    check_count,
    check_duration,
    check_greylist,
    check_key,
    check_outcome,
    tls_name,
    tls_rank,
)

# Record kinds: the <kind> part of a key name. Part of the stored format (docs/store.md).
GREYLIST: Final = "grey"
RATE: Final = "rate"
SLOT: Final = "slot"
REPUTATION: Final = "rep"
TLS: Final = "tls"
PASS_CACHE: Final = "pass"

# Everything outside printable ASCII, plus the hash-tag braces and the escape character itself.
_UNSAFE = re.compile(r"[^\x21-\x24\x26-\x7a\x7c\x7e]+")

# The server's clock in milliseconds. Allowed in scripts since Redis 5 (effects replication).
_NOW = """
local function server_now()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""

# Hash: first (ms), exp (ms, logical expiry), passed (ms of the last pass; absent while pending).
# `exp` is kept besides the TTL so that an injected `now` judges expiry the way the TTL would.
_GREYLIST_LUA = (
    _NOW
    + """
local now = tonumber(ARGV[1]) or server_now()
local delay, window, expire = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local rec = redis.call('HMGET', KEYS[1], 'first', 'exp', 'passed')
local first, exp = tonumber(rec[1]), tonumber(rec[2])
if not first or not exp or exp <= now then
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], 'first', now, 'exp', now + window)
  redis.call('PEXPIRE', KEYS[1], window)
  return {now, 0, delay}
end
if rec[3] or now - first >= delay then
  redis.call('HSET', KEYS[1], 'passed', now, 'exp', now + expire)
  redis.call('PEXPIRE', KEYS[1], expire)
  return {first, 1, 0}
end
return {first, 0, first + delay - now}
"""
)

# String: the count. The window is the key's TTL, set by the hit that opened it.
_RATE_LUA = """
local limit, cost, window = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local count = tonumber(redis.call('GET', KEYS[1]))
local ttl = redis.call('PTTL', KEYS[1])
if not count or ttl < 0 then
  count, ttl = 0, -1
end
if count + cost > limit then
  if ttl < 0 then ttl = window end
  return {count, 0, ttl}
end
count = count + cost
if ttl < 0 then
  redis.call('SET', KEYS[1], count, 'PX', window)
  ttl = window
else
  redis.call('SET', KEYS[1], count, 'KEEPTTL')
end
return {count, 1, ttl}
"""

# Sorted set: token -> the slot's expiry (ms). The key lives as long as its last slot.
_SLOT_LUA = (
    _NOW
    + """
local now = server_now()
local limit, ttl = tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local held = redis.call('ZCARD', KEYS[1])
if held >= limit then
  return {0, held}
end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
if redis.call('PTTL', KEYS[1]) < ttl then
  redis.call('PEXPIRE', KEYS[1], ttl)
end
return {1, held + 1}
"""
)

# Hash: first, last (ms), n:<outcome> (counts).
_REPUTATION_LUA = (
    _NOW
    + """
local now = server_now()
local expire = tonumber(ARGV[2])
redis.call('HSETNX', KEYS[1], 'first', now)
redis.call('HSET', KEYS[1], 'last', now)
redis.call('HINCRBY', KEYS[1], 'n:' .. ARGV[1], 1)
if redis.call('PTTL', KEYS[1]) < expire then
  redis.call('PEXPIRE', KEYS[1], expire)
end
return redis.call('HGETALL', KEYS[1])
"""
)

# Hash: first, last (ms), tls, plain (session counts), best, floor (version ranks, 0 = none).
# ARGV[1] names the field to raise ('best' for a session, 'floor' to raise the floor), ARGV[2]
# the rank, ARGV[3] the counter to increment ('tls', 'plain' or '' for none).
_TLS_LUA = (
    _NOW
    + """
local now = server_now()
local rank, expire = tonumber(ARGV[2]), tonumber(ARGV[4])
redis.call('HSETNX', KEYS[1], 'first', now)
redis.call('HSET', KEYS[1], 'last', now)
if ARGV[3] ~= '' then
  redis.call('HINCRBY', KEYS[1], ARGV[3], 1)
end
if rank > (tonumber(redis.call('HGET', KEYS[1], ARGV[1])) or 0) then
  redis.call('HSET', KEYS[1], ARGV[1], rank)
end
if redis.call('PTTL', KEYS[1]) < expire then
  redis.call('PEXPIRE', KEYS[1], expire)
end
return redis.call('HGETALL', KEYS[1])
"""
)


def record_key(kind: str, key: str) -> str:
    """The Redis key of record `kind` for the caller's `key`: sk:v1:<kind>:{<escaped key>}."""
    escaped = _UNSAFE.sub(lambda m: "".join(f"%{byte:02X}" for byte in m.group().encode()), key)
    return f"{KEY_PREFIX}{kind}:{{{escaped}}}"


def _ms(seconds: float) -> int:
    """Seconds to whole milliseconds, at least 1 (PEXPIRE 0 would delete the key at once)."""
    return max(1, round(seconds * 1000))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _fields(reply: Sequence[bytes | str] | Mapping[bytes | str, bytes | str]) -> dict[str, str]:
    """A hash from HGETALL: a dict from the client, a flat [k, v, k, v] list from a script.

    Text keys and values, so a client made with decode_responses=True works as well.
    """
    if isinstance(reply, Mapping):
        return {_text(name): _text(value) for name, value in reply.items()}
    return {_text(name): _text(value) for name, value in zip(reply[::2], reply[1::2], strict=True)}


def _seconds(fields: dict[str, str], name: str) -> float:
    return int(fields[name]) / 1000


def _reputation(fields: dict[str, str]) -> Reputation:
    try:
        return Reputation(
            first_seen=_seconds(fields, "first"),
            last_seen=_seconds(fields, "last"),
            counts={
                name[2:]: int(value) for name, value in fields.items() if name.startswith("n:")
            },
        )
    except (KeyError, ValueError) as exc:
        raise StoreError(f"corrupt reputation record {fields!r}") from exc


def _tls_history(fields: dict[str, str]) -> TlsHistory:
    try:
        return TlsHistory(
            first_seen=_seconds(fields, "first"),
            last_seen=_seconds(fields, "last"),
            with_tls=int(fields.get("tls", 0)),
            without_tls=int(fields.get("plain", 0)),
            best_version=tls_name(int(fields.get("best", 0))),
            floor=tls_name(int(fields.get("floor", 0))),
        )
    except (KeyError, ValueError) as exc:
        raise StoreError(f"corrupt TLS history record {fields!r}") from exc


def display_url(url: str) -> str:
    """scheme://host:port/db of a Redis URL, without user or password, for messages."""
    parts = urlsplit(url)
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:  # not a number: shown as given, it is what the admin must fix
        port = ":" + parts.netloc.rpartition(":")[2]
    return f"{parts.scheme}://{parts.hostname or 'localhost'}{port}{parts.path}"


class RedisStore:
    """The Store protocol over one Redis client (a single node, a Sentinel master or a Cluster).

    `RedisStore.from_url()` builds a single-node client with bounded waits; for Sentinel or
    Cluster, build the client yourself (docs/store.md) and pass it in.
    """

    def __init__(
        self,
        client: Redis | RedisCluster,
        *,
        name: str = "redis",
        owns_client: bool = True,
        max_in_flight: int = 16,
        wait_timeout: float = 1.0,
    ) -> None:
        """Use `client` (closed by close() if `owns_client`).

        At most `max_in_flight` operations of this store are sent at once; the others wait
        their turn in arrival order, up to `wait_timeout` seconds, then StoreError.
        """
        self._client = client
        self._name = name  # for error messages: never the URL with its password
        self._owns_client = owns_client
        self._closed = False
        # A FIFO semaphore in front of the pool, not redis-py's BlockingConnectionPool: under
        # a steady load its condition variable let a releasing caller take the connection
        # straight back, and waiters starved into "No connection available" (measured at 32
        # callers on 4 connections). asyncio.Semaphore wakes waiters in order.
        self._max_in_flight = check_count("max_in_flight", max_in_flight)
        self._in_flight = asyncio.Semaphore(max_in_flight)
        self._wait_timeout = check_duration("wait_timeout", wait_timeout)
        self._greylist = client.register_script(_GREYLIST_LUA)
        self._rate = client.register_script(_RATE_LUA)
        self._slot = client.register_script(_SLOT_LUA)
        self._record_outcome = client.register_script(_REPUTATION_LUA)
        self._tls = client.register_script(_TLS_LUA)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        timeout: float = 1.0,
        connect_timeout: float | None = None,
        max_connections: int = 16,
    ) -> RedisStore:
        """A store on `redis://[user:password@]host:port/db` or `rediss://...` (TLS).

        Nothing is connected yet: a Redis that is down at start-up fails the first operation,
        not the MX. `timeout` bounds every socket read and the wait for a free connection;
        `connect_timeout` (default `timeout`) bounds connecting. At most `max_connections`
        operations are in flight per store; more wait their turn.
        """
        if not url.startswith(("redis://", "rediss://")):
            raise ValueError(f"not a redis:// or rediss:// URL: {display_url(url)!r}")
        timeout = check_duration("timeout", timeout)
        connect = (
            timeout
            if connect_timeout is None
            else check_duration("connect_timeout", connect_timeout)
        )
        check_count("max_connections", max_connections)
        try:
            pool = ConnectionPool.from_url(
                url,
                max_connections=max_connections,
                socket_timeout=timeout,
                socket_connect_timeout=connect,
                retry=Retry(NoBackoff(), 0),
                # RESP2: with redis-py 8's default (RESP3, maintenance notifications "auto") the
                # pool skips its check for a connection the server closed, so after every
                # Redis restart each pooled connection failed one operation (measured). RESP2
                # also skips the HELLO round trip on connect and works with every server.
                protocol=2,
            )
        except ValueError as exc:
            raise ValueError(f"bad Redis URL {display_url(url)!r}: {exc}") from None
        return cls(
            Redis.from_pool(pool),
            name=display_url(url),
            max_in_flight=max_connections,
            wait_timeout=timeout,
        )

    @property
    def client(self) -> Redis | RedisCluster:
        return self._client

    @contextlib.asynccontextmanager
    async def _turn(self) -> AsyncIterator[None]:
        """Wait for a turn, then turn any Redis or socket failure into StoreError."""
        if self._closed:
            raise StoreError(f"{self._name}: store closed")
        if self._in_flight.locked():
            try:
                async with asyncio.timeout(self._wait_timeout):
                    await self._in_flight.acquire()
            except TimeoutError:
                raise StoreError(
                    f"{self._name}: all {self._max_in_flight} connections stayed busy for"
                    f" {self._wait_timeout:g} s"
                ) from None
        else:
            await self._in_flight.acquire()  # free: returns at once, no timer needed
        try:
            yield
        except (RedisError, OSError) as exc:
            # OSError: a socket error the client did not wrap (TimeoutError is one in 3.11).
            detail = str(exc) or type(exc).__name__
            raise StoreError(f"{self._name}: {detail}") from exc
        finally:
            self._in_flight.release()

    async def greylist(
        self,
        key: str,
        *,
        delay: float,
        expire: float,
        retry_window: float | None = None,
        now: float | None = None,
    ) -> GreylistResult:
        check_key(key)
        delay, window, expire = check_greylist(delay, expire, retry_window, now)
        args = ("" if now is None else round(now * 1000), round(delay * 1000), _ms(window))
        async with self._turn():
            reply = await self._greylist(
                keys=[record_key(GREYLIST, key)], args=(*args, _ms(expire))
            )
        first, passed, retry_after = (int(x) for x in reply)
        return GreylistResult(
            first_seen=first / 1000, passed=bool(passed), retry_after=retry_after / 1000
        )

    async def hit_rate(self, key: str, *, window: float, limit: int, cost: int = 1) -> RateResult:
        check_key(key)
        window = check_duration("window", window)
        check_count("limit", limit)
        check_count("cost", cost)
        async with self._turn():
            reply = await self._rate(keys=[record_key(RATE, key)], args=(limit, cost, _ms(window)))
        count, allowed, reset_after = (int(x) for x in reply)
        return RateResult(count=count, allowed=bool(allowed), reset_after=reset_after / 1000)

    async def acquire_slot(self, key: str, *, limit: int, ttl: float) -> SlotLease | None:
        check_key(key)
        check_count("limit", limit)
        ttl = check_duration("ttl", ttl)
        token = secrets.token_hex(8)
        async with self._turn():
            reply = await self._slot(keys=[record_key(SLOT, key)], args=(token, limit, _ms(ttl)))
        acquired, in_use = (int(x) for x in reply)
        return SlotLease(key=key, token=token, in_use=in_use) if acquired else None

    async def release_slot(self, lease: SlotLease) -> None:
        name = record_key(SLOT, check_key(lease.key))
        async with self._turn():
            await self._client.zrem(name, lease.token)

    async def record_outcome(self, key: str, outcome: str, *, expire: float) -> Reputation:
        check_key(key)
        check_outcome(outcome)
        expire = check_duration("expire", expire)
        async with self._turn():
            reply = await self._record_outcome(
                keys=[record_key(REPUTATION, key)], args=(outcome, _ms(expire))
            )
        return _reputation(_fields(reply))

    async def reputation(self, key: str) -> Reputation | None:
        name = record_key(REPUTATION, check_key(key))
        async with self._turn():
            fields = await self._client.hgetall(name)
        return _reputation(_fields(fields)) if fields else None

    async def record_tls(self, key: str, *, version: str | None, expire: float) -> TlsHistory:
        check_key(key)
        rank = tls_rank(version)
        expire = check_duration("expire", expire)
        counter = "tls" if rank else "plain"
        async with self._turn():
            reply = await self._tls(
                keys=[record_key(TLS, key)], args=("best", rank, counter, _ms(expire))
            )
        return _tls_history(_fields(reply))

    async def raise_tls_floor(self, key: str, version: str, *, expire: float) -> TlsHistory:
        check_key(key)
        rank = tls_rank(version)
        if rank == 0:
            raise ValueError("the TLS floor is a TLS version, not None")
        expire = check_duration("expire", expire)
        async with self._turn():
            reply = await self._tls(
                keys=[record_key(TLS, key)], args=("floor", rank, "", _ms(expire))
            )
        return _tls_history(_fields(reply))

    async def tls_history(self, key: str) -> TlsHistory | None:
        name = record_key(TLS, check_key(key))
        async with self._turn():
            fields = await self._client.hgetall(name)
        return _tls_history(_fields(fields)) if fields else None

    async def pass_cache_get(self, key: str) -> bool:
        name = record_key(PASS_CACHE, check_key(key))
        async with self._turn():
            found = await self._client.exists(name)
        return bool(found)

    async def pass_cache_put(self, key: str, *, ttl: float) -> None:
        name = record_key(PASS_CACHE, check_key(key))
        ttl = check_duration("ttl", ttl)
        async with self._turn():
            await self._client.set(name, b"1", px=_ms(ttl))

    async def ping(self) -> None:
        async with self._turn():
            await self._client.ping()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._owns_client:
            with contextlib.suppress(RedisError, OSError):
                await self._client.aclose()
