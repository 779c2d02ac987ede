"""What every real resolver shares: settings, the answer cache and single-flight lookups.

Standard library only. ``CachingResolver`` is the base of ``DnspythonResolver`` and
``CaresResolver``: it checks the settings (``ConfigError`` lines naming the ``dns.`` key),
normalises names, answers from ``AnswerCache``, joins identical lookups in flight and raises
the ``DnsError`` an entry carries. A subclass only implements ``_query``: one lookup on the
wire, returned as ``(Entry, seconds to keep it)``, never raising a DNS failure. So the cache
rules (docs/dns.md, "Caching rules") are one piece of code for both backends.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from spamkiller.dns.resolver import DnsError, Tlsa, normalise_name
from spamkiller.errors import ConfigError

__all__ = ["AnswerCache", "CacheStats", "CachingResolver", "Entry", "parse_nameserver"]

# Rough bytes per cache entry besides the values: key tuple, entry, OrderedDict slot.
_ENTRY_OVERHEAD = 200


# --------------------------------------------------------------------------------------------
# Nameservers
# --------------------------------------------------------------------------------------------


def parse_nameserver(text: str) -> tuple[str, int]:
    """``"192.0.2.1"``, ``"192.0.2.1:5353"``, ``"2001:db8::1"`` or ``"[2001:db8::1]:5353"``.

    Returns (address, port). Raises ValueError: a nameserver must be an IP address, since
    resolving its name would need a resolver.
    """
    host, port = text.strip(), "53"
    if host.startswith("["):
        host, sep, rest = host[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"{text!r}: expected [IPv6]:port")
        port = rest[1:] or port
    elif host.count(":") == 1:
        host, _, port = host.partition(":")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{text!r}: not an IP address (optionally with :port)") from None
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{text!r}: port must be between 1 and 65535")
    return str(address), int(port)


# --------------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Entry:
    """A looked-up result: values, or the DnsError class (and reason) to raise for it."""

    values: tuple[object, ...] = ()
    error: type[DnsError] | None = None
    reason: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class CacheStats:
    """Counters since the resolver was built, for metrics and the benchmark."""

    hits: int  # answered from the cache
    misses: int  # not in the cache (or expired): a query was started or joined
    queries: int  # queries actually sent (misses minus those that joined one in flight)
    entries: int  # entries held now
    bytes: int  # estimated bytes held now
    evictions: int  # entries dropped to stay within cache_size / cache_bytes


class AnswerCache:
    """A TTL-honouring LRU map, bounded by entries and by estimated bytes.

    ``clock`` is monotonic seconds (injected so tests need not sleep). Expired entries are
    dropped when met; the bounds are kept on every insert by dropping the least recently used.
    """

    def __init__(
        self,
        max_entries: int,
        max_bytes: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.clock = clock
        self.bytes = 0
        self.evictions = 0
        # key -> (entry, expires at, size)
        self._data: OrderedDict[tuple[str, int], tuple[Entry, float, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: tuple[str, int]) -> Entry | None:
        item = self._data.get(key)
        if item is None:
            return None
        entry, expires, size = item
        if self.clock() >= expires:
            del self._data[key]
            self.bytes -= size
            return None
        self._data.move_to_end(key)
        return entry

    def put(self, key: tuple[str, int], entry: Entry, ttl: float) -> None:
        if ttl <= 0 or self.max_entries <= 0:
            return
        size = _ENTRY_OVERHEAD + len(key[0]) + sum(_size(v) for v in entry.values)
        if size > self.max_bytes:
            return
        old = self._data.pop(key, None)
        if old is not None:
            self.bytes -= old[2]
        self._data[key] = (entry, self.clock() + ttl, size)
        self.bytes += size
        while len(self._data) > self.max_entries or self.bytes > self.max_bytes:
            _, (_, _, dropped) = self._data.popitem(last=False)
            self.bytes -= dropped
            self.evictions += 1

    def clear(self) -> None:
        self._data.clear()
        self.bytes = 0


def _size(value: object) -> int:
    if isinstance(value, str):
        return 50 + len(value)
    if isinstance(value, Tlsa):
        return 100 + len(value.data)
    if isinstance(value, tuple):  # (preference, exchange)
        return 100 + sum(len(v) for v in value if isinstance(v, str))
    return 50


# --------------------------------------------------------------------------------------------
# The shared resolver machinery
# --------------------------------------------------------------------------------------------


class CachingResolver:
    """Settings, cache and single flight; subclasses implement ``_query``.

    ``nameservers``: IP addresses, optionally with ``:port`` (``[v6]:port``); ``None`` means
    the system's ``/etc/resolv.conf`` (read by the subclass). ``timeout``: seconds per lookup,
    all retries included. ``cache_size``: entries (0 disables the cache). TTLs are clamped to
    ``[min_ttl, max_ttl]``, negative ones to ``[min_ttl, max_negative_ttl]``. Bad arguments
    raise ConfigError naming the ``dns.`` key.
    """

    def __init__(
        self,
        nameservers: list[str] | None = None,
        timeout: float = 5.0,
        cache_size: int = 10_000,
        *,
        min_ttl: float = 0.0,
        max_ttl: float = 3600.0,
        max_negative_ttl: float = 300.0,
        cache_bytes: int = 32 * 2**20,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        problems: list[str] = []
        servers: list[tuple[str, int]] = []
        for i, text in enumerate(nameservers or []):
            try:
                servers.append(parse_nameserver(text))
            except ValueError as exc:
                problems.append(f"dns.nameservers.{i}: {exc}")
        if nameservers is not None and not nameservers:
            problems.append("dns.nameservers: empty list (leave it out to use /etc/resolv.conf)")
        if not timeout > 0:
            problems.append("dns.timeout: must be more than 0 seconds")
        if cache_size < 0:
            problems.append("dns.cache_size: must be 0 (no cache) or more")
        if cache_bytes < 0:
            problems.append("dns.cache_bytes: must be 0 or more")
        if min_ttl < 0:
            problems.append("dns.min_ttl: must be 0 or more")
        if max_ttl < min_ttl:
            problems.append("dns.max_ttl: must not be less than min_ttl")
        if max_negative_ttl < min_ttl:
            problems.append("dns.max_negative_ttl: must not be less than min_ttl")
        if problems:
            raise ConfigError(problems)

        self._servers = servers
        self.timeout = float(timeout)
        self.min_ttl = float(min_ttl)
        self.max_ttl = float(max_ttl)
        self.max_negative_ttl = float(max_negative_ttl)
        self._cache = AnswerCache(cache_size, cache_bytes, clock)
        self._inflight: dict[tuple[str, int], asyncio.Task[tuple[Entry, float]]] = {}
        self._hits = 0
        self._misses = 0
        self._queries = 0
        # The arguments as given, so a backend can make a helper resolver just like itself.
        self._arguments: dict[str, Any] = {
            "nameservers": nameservers,
            "timeout": timeout,
            "cache_size": cache_size,
            "min_ttl": min_ttl,
            "max_ttl": max_ttl,
            "max_negative_ttl": max_negative_ttl,
            "cache_bytes": cache_bytes,
            "clock": clock,
        }
        self._start()

    def _start(self) -> None:
        """The backend's own setup, once the settings are checked (ConfigError if unusable)."""

    @property
    def stats(self) -> CacheStats:
        return CacheStats(
            hits=self._hits,
            misses=self._misses,
            queries=self._queries,
            entries=len(self._cache),
            bytes=self._cache.bytes,
            evictions=self._cache.evictions,
        )

    def clear_cache(self) -> None:
        self._cache.clear()

    async def _query(self, qname: str, rdtype: int) -> tuple[Entry, float]:
        """One lookup of absolute ``qname``, as (entry, seconds to cache it). Never raises a
        DNS failure: those are entries with ``error`` set."""
        raise NotImplementedError

    async def _lookup(self, name: str, rdtype: int, label: str) -> tuple[object, ...]:
        """The values for (``name``, ``rdtype``) from the cache, a query in flight or a new
        query; raises the entry's DnsError. ``label`` names the type in errors."""
        qname = normalise_name(name, label)
        key = (qname, rdtype)
        cached = self._cache.get(key)
        if cached is not None:
            self._hits += 1
            entry = cached
        else:
            self._misses += 1
            task = self._inflight.get(key)
            if task is None:
                self._queries += 1
                task = asyncio.get_running_loop().create_task(self._query(qname, rdtype))
                self._inflight[key] = task
                task.add_done_callback(partial(self._query_done, key))
            # Shielded: one caller's cancellation (its check timed out) must neither cancel
            # the query for the others nor leave the cache unfilled.
            entry, _ttl = await asyncio.shield(task)
        if entry.error is not None:
            raise entry.error(qname[:-1] or ".", label, entry.reason)
        return entry.values

    def _query_done(self, key: tuple[str, int], task: asyncio.Task[tuple[Entry, float]]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if task.cancelled():
            return
        if task.exception() is None:  # marks a bug's exception as retrieved; callers saw it
            entry, ttl = task.result()
            self._cache.put(key, entry, ttl)

    def _positive(self, ttl: float) -> float:
        return min(max(ttl, self.min_ttl), self.max_ttl)

    def _negative(self, ttl: float) -> float:
        return min(max(ttl, self.min_ttl), self.max_negative_ttl)
