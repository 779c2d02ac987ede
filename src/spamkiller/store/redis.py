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
- `from_url` builds the client from the `state` URL: one node (`redis://`, `rediss://`), a
  Sentinel-managed primary (`redis-sentinel://`, `rediss-sentinel://`) or a Cluster
  (`redis-cluster://`, `rediss-cluster://`); see parse_ha_url and docs/store.md. None of them
  connects before the first operation.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import re
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal
from urllib.parse import parse_qsl, unquote

from redis.asyncio import ConnectionPool, Redis, RedisCluster
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError

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
    """scheme://host:port/path of a Redis URL, without user, password or options, for messages.

    Everything up to the last `@` is taken as user and password, so a password holding a raw
    `/`, `?` or `#` still stays out of the message. Several hosts (Sentinel, Cluster) are shown
    as written: `redis-sentinel://s1:26379,s2:26379/mymaster`.
    """
    scheme, _, rest = url.partition("://")
    location = re.split(r"[?#]", rest.rpartition("@")[2], maxsplit=1)[0]
    hosts, slash, path = location.partition("/")
    return f"{scheme}://{hosts or 'localhost'}{slash}{path}"


# --- Sentinel and Cluster URLs ------------------------------------------------------------------

SENTINEL_SCHEMES: Final = ("redis-sentinel", "rediss-sentinel")
CLUSTER_SCHEMES: Final = ("redis-cluster", "rediss-cluster")
SENTINEL_PORT: Final = 26379
REDIS_PORT: Final = 6379
# Query options a Sentinel or Cluster URL accepts. No secrets here: a query string is shown in
# logs as written, so passwords go in the user part only.
TLS_OPTIONS: Final = frozenset(
    {"ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "ssl_check_hostname"}
)
_HOST_NAME = re.compile(r"[A-Za-z0-9._-]+")  # a DNS name or an IPv4 address
_PORT = re.compile(r"[0-9]{1,5}")
_BOOLEANS: Final = {"yes": True, "true": True, "1": True, "no": False, "false": False, "0": False}


@dataclass(frozen=True)
class HaUrl:
    """A parsed Sentinel or Cluster URL (see parse_ha_url)."""

    kind: Literal["sentinel", "cluster"]
    tls: bool
    nodes: tuple[tuple[str, int], ...]  # the sentinels, or the Cluster's startup nodes
    service: str  # the Sentinel service (master) name; "" for a Cluster
    db: int
    username: str | None
    password: str | None = field(repr=False)
    sentinel_auth: bool  # authenticate to the sentinels with username/password too
    tls_options: Mapping[str, str | bool]


def parse_ha_url(url: str) -> HaUrl:
    """Parse a Sentinel or Cluster URL; ValueError (without the password) if it is malformed.

        redis-sentinel://[user:password@]host[:26379],host[:26379]/service[/db][?sentinel_auth=yes]
        redis-cluster://[user:password@]host[:6379],host[:6379][/0]

    `rediss-sentinel://` and `rediss-cluster://` use TLS for every connection (sentinels and
    data nodes) and accept the TLS options `ssl_ca_certs`, `ssl_certfile`, `ssl_keyfile`,
    `ssl_cert_reqs` (none, optional, required) and `ssl_check_hostname` (yes, no). The user and
    password are for the data nodes; `sentinel_auth=yes` sends them to the sentinels as well.
    IPv6 addresses go in brackets: `[2001:db8::1]:26379`.
    """
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in (*SENTINEL_SCHEMES, *CLUSTER_SCHEMES):
        raise ValueError(f"not a Sentinel or Cluster URL: {display_url(url)!r}")
    kind: Literal["sentinel", "cluster"] = "sentinel" if scheme in SENTINEL_SCHEMES else "cluster"
    shown = display_url(url)

    def bad(reason: str) -> ValueError:
        return ValueError(f"bad {scheme} URL {shown!r}: {reason}")

    # The last "@" ends the user part, so that no part of a password leaks into a message even
    # when it holds a raw "@", "/", "?" or "#"; those are refused all the same, because other
    # code (the server's log line) splits the URL the usual way.
    userinfo, at, location = rest.rpartition("@")
    if any(char in userinfo for char in "@/?#"):
        raise bad("percent-encode @ / ? # in the user name and password (%40 %2F %3F %23)")
    location, _, fragment = location.partition("#")
    if fragment:
        raise bad("no #fragment allowed")
    location, _, query = location.partition("?")
    hosts, _, path = location.partition("/")
    default_port = SENTINEL_PORT if kind == "sentinel" else REDIS_PORT
    what = "sentinel" if kind == "sentinel" else "cluster node"
    if not hosts:
        raise bad(f"needs at least one {what}: {scheme}://host1:{default_port},host2:...")
    nodes = tuple(_node(text, default_port, bad) for text in hosts.split(","))

    segments = path.removesuffix("/").split("/") if path.removesuffix("/") else []
    service, db = "", 0
    if kind == "sentinel":
        if not segments:
            raise bad(f"needs the service name: {scheme}://host:26379/mymaster")
        service = unquote(segments[0])
        if not service.isprintable() or " " in service:
            raise bad("the service name must be printable, without spaces")
        if len(segments) > 2 or (len(segments) == 2 and not _PORT.fullmatch(segments[1])):
            raise bad("the path is /<service name> or /<service name>/<db number>")
        db = int(segments[1]) if len(segments) == 2 else 0
    elif segments not in ([], ["0"]):
        raise bad("Redis Cluster has no databases: leave the path empty or write /0")

    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon and secret else None

    sentinel_auth = False
    tls_options: dict[str, str | bool] = {}
    seen: set[str] = set()
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name in seen:
            raise bad(f"option {name!r} given twice")
        seen.add(name)
        if name == "sentinel_auth" and kind == "sentinel":
            if value.lower() not in _BOOLEANS:
                raise bad("sentinel_auth must be yes or no")
            sentinel_auth = _BOOLEANS[value.lower()]
            if sentinel_auth and username is None and password is None:
                raise bad("sentinel_auth=yes needs user:password@ (or :password@) in the URL")
        elif name in TLS_OPTIONS:
            if not scheme.startswith("rediss"):
                raise bad(f"{name} needs TLS: use {scheme.replace('redis-', 'rediss-', 1)}://")
            tls_options[name] = _tls_option(name, value, bad)
        else:
            known = sorted(TLS_OPTIONS | ({"sentinel_auth"} if kind == "sentinel" else set()))
            raise bad(f"unknown option {name!r} (known: {', '.join(known)})")
    return HaUrl(
        kind=kind,
        tls=scheme.startswith("rediss"),
        nodes=nodes,
        service=service,
        db=db,
        username=username,
        password=password,
        sentinel_auth=sentinel_auth,
        tls_options=tls_options,
    )


def _node(text: str, default_port: int, bad: Callable[[str], ValueError]) -> tuple[str, int]:
    """host, host:port, [v6] or [v6]:port."""
    if text.startswith("["):
        host, close, tail = text[1:].partition("]")
        try:
            if not close:
                raise ValueError("no ]")
            ipaddress.IPv6Address(host)
        except ValueError:
            raise bad(f"{text!r} is not a bracketed IPv6 address") from None
        if tail and not tail.startswith(":"):
            raise bad(f"{text!r}: expected :port after ]")
        port_text, has_port = tail[1:], bool(tail)
    else:
        host, colon, port_text = text.partition(":")
        has_port = bool(colon)
        if not host:
            raise bad("empty host name (two commas in a row, or a leading or trailing comma?)")
        if ":" in port_text:
            raise bad(f"{text!r}: an IPv6 address goes in brackets, [2001:db8::1]:{default_port}")
        if not _HOST_NAME.fullmatch(host):
            raise bad(f"{host!r} is not a host name or address")
    if not has_port:
        return host, default_port
    if not _PORT.fullmatch(port_text) or not 1 <= int(port_text) <= 65535:
        raise bad(f"{text!r}: the port must be a number from 1 to 65535")
    return host, int(port_text)


def _tls_option(name: str, value: str, bad: Callable[[str], ValueError]) -> str | bool:
    if name == "ssl_check_hostname":
        if value.lower() not in _BOOLEANS:
            raise bad("ssl_check_hostname must be yes or no")
        return _BOOLEANS[value.lower()]
    if name == "ssl_cert_reqs" and value not in ("none", "optional", "required"):
        raise bad("ssl_cert_reqs must be none, optional or required")
    if not value:
        raise bad(f"{name} needs a value")
    return value


def _connection_options(timeout: float, connect: float) -> dict[str, Any]:
    """What every connection of a store uses: bounded waits, no retries, RESP2 (see from_url)."""
    return {
        "socket_timeout": timeout,
        "socket_connect_timeout": connect,
        "retry": Retry(NoBackoff(), 0),
        "protocol": 2,
    }


def _sentinel_client(
    parsed: HaUrl, options: dict[str, Any], max_connections: int
) -> tuple[Redis, Sentinel]:
    """The primary's client, following failovers, and the Sentinel it asks (to close too)."""
    tls: dict[str, Any] = {"ssl": True, **parsed.tls_options} if parsed.tls else {}
    auth: dict[str, Any] = {"username": parsed.username, "password": parsed.password}
    sentinel_options = {**options, **tls, **(auth if parsed.sentinel_auth else {})}
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        list(parsed.nodes), sentinel_kwargs=sentinel_options
    )
    # Every new connection asks the sentinels for the primary's address first, and a primary
    # demoted to replica answers writes with READONLY, which drops that connection: a failover
    # is followed without a restart (the operations in flight then fail with StoreError).
    client = sentinel.master_for(
        parsed.service,
        **options,
        **tls,
        **auth,
        db=parsed.db,
        max_connections=max_connections,
    )
    return client, sentinel


def _cluster_client(parsed: HaUrl, options: dict[str, Any], max_connections: int) -> RedisCluster:
    tls: dict[str, Any] = {"ssl": True, **parsed.tls_options} if parsed.tls else {}
    return RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in parsed.nodes],
        # The servers' cluster-require-full-coverage decides whether a shard without a primary
        # stops the others; the client should not refuse every key on its own.
        require_full_coverage=False,
        # A MOVED (resharding) patches that slot's owner. The default also rebuilt the whole map
        # on every 5th MOVED by closing every connection, in use or not, which failed the other
        # callers' operations mid-flight.
        reinitialize_steps=0,
        max_connections=max_connections,  # per node; the store's FIFO bounds the total anyway
        username=parsed.username,
        password=parsed.password,
        **options,
        **tls,
    )


class RedisStore:
    """The Store protocol over one Redis client (a single node, a Sentinel master or a Cluster).

    `RedisStore.from_url()` builds the client from a `state` URL with bounded waits; a client
    built by hand (other options) can be passed in as well.
    """

    def __init__(
        self,
        client: Redis | RedisCluster,
        *,
        name: str = "redis",
        owns_client: bool = True,
        max_in_flight: int = 16,
        wait_timeout: float = 1.0,
        on_close: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Use `client` (closed by close() if `owns_client`).

        At most `max_in_flight` operations of this store are sent at once; the others wait
        their turn in arrival order, up to `wait_timeout` seconds, then StoreError.
        `on_close` is awaited by close() after the client (a Sentinel's own connections).
        """
        self._client = client
        self._name = name  # for error messages: never the URL with its password
        self._owns_client = owns_client
        self._on_close = on_close
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
        self._cluster = client if isinstance(client, RedisCluster) else None
        self._learning: asyncio.Future[RedisCluster] | None = None  # see _learn_topology

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        timeout: float = 1.0,
        connect_timeout: float | None = None,
        max_connections: int = 16,
    ) -> RedisStore:
        """A store on `redis://[user:password@]host:port/db` or `rediss://...` (TLS), or on a
        Sentinel or Cluster URL (`redis-sentinel://`, `redis-cluster://`, TLS: `rediss-...`;
        see parse_ha_url).

        Nothing is connected yet: a Redis that is down at start-up fails the first operation,
        not the MX. `timeout` bounds every socket read and the wait for a free connection;
        `connect_timeout` (default `timeout`) bounds connecting. At most `max_connections`
        operations are in flight per store; more wait their turn.
        """
        scheme = url.partition("://")[0]
        ha = scheme in (*SENTINEL_SCHEMES, *CLUSTER_SCHEMES)
        if not ha and not url.startswith(("redis://", "rediss://")):
            raise ValueError(f"not a Redis URL: {display_url(url)!r}")
        parsed = parse_ha_url(url) if ha else None  # first: a malformed URL is the first problem
        timeout = check_duration("timeout", timeout)
        connect = (
            timeout
            if connect_timeout is None
            else check_duration("connect_timeout", connect_timeout)
        )
        check_count("max_connections", max_connections)
        if parsed is not None:
            options = _connection_options(timeout, connect)
            client: Redis | RedisCluster
            on_close = None
            if parsed.kind == "sentinel":
                client, sentinel = _sentinel_client(parsed, options, max_connections)
                on_close = sentinel.aclose
            else:
                client = _cluster_client(parsed, options, max_connections)
            return cls(
                client,
                name=display_url(url),
                max_in_flight=max_connections,
                wait_timeout=timeout,
                on_close=on_close,
            )
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
            if self._cluster is not None and self._cluster.get_default_node() is None:
                await self._learn_topology(self._cluster)
            yield
        except (RedisError, RedisClusterException, OSError) as exc:
            # OSError: a socket error the client did not wrap (TimeoutError is one in 3.11).
            # RedisClusterException is not a RedisError: "no node reachable", "slot not covered".
            detail = str(exc) or type(exc).__name__
            raise StoreError(f"{self._name}: {detail}") from exc
        finally:
            self._in_flight.release()

    async def _learn_topology(self, cluster: RedisCluster) -> None:
        """Ask the Cluster for its slot map once, while the other callers wait.

        redis-py 8.1 routes a keyed command that starts before the client knows a node (at
        first use, or after it dropped its topology on CLUSTERDOWN) to a random primary:
        MOVED for most keys. Concurrent callers then piled up MOVEDs, and every 5th made the
        client close every connection, failing the others (measured: 130 to 170 of 200
        concurrent first calls failed). Learning the map first, alone, routes every call by its
        slot.

        Callers arriving meanwhile share the one attempt and its outcome, so a Cluster that is
        down costs each of them one attempt's wait, not one per caller queued ahead.
        """
        if self._learning is None:
            learning = asyncio.ensure_future(cluster.initialize())
            self._learning = learning

            def done(task: asyncio.Future[RedisCluster]) -> None:
                self._learning = None  # the next caller tries again
                if not task.cancelled():
                    task.exception()  # seen, even if every caller waiting for it gave up

            learning.add_done_callback(done)
        # shield: a caller cancelled by its check's timeout must not cancel the others' attempt.
        await asyncio.shield(self._learning)

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
        if self._learning is not None:
            self._learning.cancel()
        if self._owns_client:
            with contextlib.suppress(RedisError, RedisClusterException, OSError):
                await self._client.aclose()
        if self._on_close is not None:
            with contextlib.suppress(RedisError, OSError):
                await self._on_close()
