"""``DnspythonResolver``: the production ``Resolver``, on dnspython's ``dns.asyncresolver``.

The only module of the project that imports dnspython. Rules it keeps:

- **One per process, reused.** The composition root builds it once (per worker) and hands it to
  every check; its cache and its in-flight table only pay off when shared. Building one reads
  ``/etc/resolv.conf`` when no nameservers are given; nothing else it does blocks the loop.
- **Every lookup is bounded by ``timeout``** (seconds, the whole lookup: retries, every
  nameserver, a TCP retry after truncation), enforced both by dnspython's ``lifetime`` and by an
  ``asyncio.timeout`` around it. A timeout is a ``DnsTempError``, never a hang.
- **Concurrent identical lookups share one query.** The query runs in its own task; callers
  await it shielded, so one caller's cancellation (its check timed out) neither cancels the
  query for the others nor leaves the cache unfilled.
- **The cache** holds positive answers and NXDOMAIN/NODATA, keyed by (normalised name, type),
  for the answer's TTL clamped to ``[min_ttl, max_ttl]`` (``max_negative_ttl`` for negative
  answers, whose TTL is the SOA's per RFC 2308; a negative answer without SOA is kept only for
  ``min_ttl``). A TTL of 0 after clamping is not stored. Temporary failures are never cached:
  the recursive resolver behind us already rate-limits its own retries, and a cached SERVFAIL
  would outlive a fixed DNSBL. The cache is bounded by entries (``cache_size``) and by an
  estimate of the bytes held (``cache_bytes``); the least recently used entry goes first. Values
  are stored converted (Python strings, not dnspython objects), so a hit costs a dict lookup.
- **Queries**: recursion desired, EDNS0 with a 1232-byte payload (DNS flag day 2020: no IP
  fragmentation), no search list, names built label by label from ``normalise_name`` (no
  escape processing). TLSA queries set DO and AD, so a validating resolver reports the AD bit;
  nothing else asks for DNSSEC records it would not use.
- **Errors**: NXDOMAIN and YXDOMAIN become ``DnsNxDomain``; an empty NOERROR answer
  ``DnsNoData``; SERVFAIL, REFUSED, FORMERR, timeouts, network errors and malformed replies
  from every nameserver become ``DnsTempError``. Nothing dnspython raises leaves this module.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TypeVar, cast

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver
import dns.rrset
from dns.rdtypes.ANY.MX import MX
from dns.rdtypes.ANY.PTR import PTR
from dns.rdtypes.ANY.SOA import SOA
from dns.rdtypes.ANY.TLSA import TLSA
from dns.rdtypes.ANY.TXT import TXT
from dns.rdtypes.IN.A import A
from dns.rdtypes.IN.AAAA import AAAA

from spamkiller.dns.resolver import (
    DnsError,
    DnsNoData,
    DnsNxDomain,
    DnsTempError,
    Tlsa,
    normalise_name,
    reverse_name,
)
from spamkiller.errors import ConfigError

__all__ = ["AnswerCache", "CacheStats", "DnspythonResolver", "parse_nameserver"]

T = TypeVar("T")

EDNS_PAYLOAD = 1232  # DNS flag day 2020: the largest UDP answer that avoids IP fragmentation
MAX_ATTEMPT = 2.0  # dnspython's per-server attempt timeout when several servers share the budget
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
class _Entry:
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
        self._data: OrderedDict[tuple[str, int], tuple[_Entry, float, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: tuple[str, int]) -> _Entry | None:
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

    def put(self, key: tuple[str, int], entry: _Entry, ttl: float) -> None:
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
# Converting answers
# --------------------------------------------------------------------------------------------


def _name_text(name: dns.name.Name) -> str:
    if name == dns.name.root:
        return "."
    return name.canonicalize().to_text(omit_final_dot=True)


def _a(rrset: dns.rrset.RRset, _ad: bool) -> tuple[str, ...]:
    return tuple(cast(A, rd).address for rd in rrset)


def _aaaa(rrset: dns.rrset.RRset, _ad: bool) -> tuple[str, ...]:
    return tuple(cast(AAAA, rd).address for rd in rrset)


def _txt(rrset: dns.rrset.RRset, _ad: bool) -> tuple[str, ...]:
    return tuple(b"".join(cast(TXT, rd).strings).decode("utf-8", "replace") for rd in rrset)


def _mx(rrset: dns.rrset.RRset, _ad: bool) -> tuple[tuple[int, str], ...]:
    return tuple(
        sorted((cast(MX, rd).preference, _name_text(cast(MX, rd).exchange)) for rd in rrset)
    )


def _ptr(rrset: dns.rrset.RRset, _ad: bool) -> tuple[str, ...]:
    return tuple(_name_text(cast(PTR, rd).target) for rd in rrset)


def _tlsa(rrset: dns.rrset.RRset, ad: bool) -> tuple[Tlsa, ...]:
    return tuple(
        Tlsa(
            usage=cast(TLSA, rd).usage,
            selector=cast(TLSA, rd).selector,
            mtype=cast(TLSA, rd).mtype,
            data=cast(TLSA, rd).cert,
            authenticated=ad,
        )
        for rd in rrset
    )


def _negative_ttl(response: dns.message.Message | None) -> float:
    """RFC 2308: min(SOA TTL, SOA MINIMUM) from the authority section; 0 without a SOA."""
    if response is None:
        return 0.0
    for rrset in response.authority:
        if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
            return float(min(rrset.ttl, cast(SOA, rrset[0]).minimum))
    return 0.0


# --------------------------------------------------------------------------------------------
# The resolver
# --------------------------------------------------------------------------------------------


class DnspythonResolver:
    """The ``Resolver`` protocol over ``dns.asyncresolver``, with a bounded TTL cache.

    ``nameservers``: IP addresses, optionally with ``:port`` (``[v6]:port``); ``None`` reads
    ``/etc/resolv.conf``. ``timeout``: seconds per lookup, all retries included. ``cache_size``:
    entries (0 disables the cache). TTLs are clamped to ``[min_ttl, max_ttl]``, negative ones to
    ``[min_ttl, max_negative_ttl]``. Bad arguments raise ConfigError naming the ``dns.`` key.
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

        self.timeout = float(timeout)
        self.min_ttl = float(min_ttl)
        self.max_ttl = float(max_ttl)
        self.max_negative_ttl = float(max_negative_ttl)
        self._cache = AnswerCache(cache_size, cache_bytes, clock)
        self._inflight: dict[tuple[str, int], asyncio.Task[tuple[_Entry, float]]] = {}
        self._hits = 0
        self._misses = 0
        self._queries = 0

        plain = self._new_resolver(servers)
        self.nameservers: list[str] = [str(ns) for ns in plain.nameservers]
        self._plain = plain
        self._dnssec = self._new_resolver(servers, copy_from=plain)
        # DO: send the DNSSEC records; AD in the query (RFC 6840 5.7): report validation status.
        self._dnssec.use_edns(0, dns.flags.DO, EDNS_PAYLOAD)
        self._dnssec.flags = dns.flags.RD | dns.flags.AD

    def _new_resolver(
        self,
        servers: Sequence[tuple[str, int]],
        copy_from: dns.asyncresolver.Resolver | None = None,
    ) -> dns.asyncresolver.Resolver:
        system = not servers and copy_from is None
        try:
            resolver = dns.asyncresolver.Resolver(configure=system)
        except dns.resolver.NoResolverConfiguration:
            raise ConfigError(
                "dns.nameservers: not given, and /etc/resolv.conf names no nameserver"
            ) from None
        if copy_from is not None:
            resolver.nameservers = copy_from.nameservers
        elif servers:
            resolver.nameservers = [dns.nameserver.Do53Nameserver(a, p) for a, p in servers]
        resolver.search = []
        resolver.use_search_by_default = False
        resolver.cache = None  # ours is in front, holding converted values
        resolver.retry_servfail = False
        resolver.lifetime = self.timeout
        count = max(1, len(resolver.nameservers))
        # One server gets the whole budget; several share it, so a dead first server leaves
        # time to ask the next one.
        resolver.timeout = self.timeout if count == 1 else min(MAX_ATTEMPT, self.timeout / count)
        resolver.use_edns(0, 0, EDNS_PAYLOAD)
        return resolver

    # --- the protocol ------------------------------------------------------------------------

    async def txt(self, name: str) -> list[str]:
        return await self._lookup(name, dns.rdatatype.TXT, _txt)

    async def a(self, name: str) -> list[str]:
        return await self._lookup(name, dns.rdatatype.A, _a)

    async def aaaa(self, name: str) -> list[str]:
        return await self._lookup(name, dns.rdatatype.AAAA, _aaaa)

    async def mx(self, name: str) -> list[tuple[int, str]]:
        return await self._lookup(name, dns.rdatatype.MX, _mx)

    async def ptr(self, ip: str) -> list[str]:
        return await self._lookup(reverse_name(ip), dns.rdatatype.PTR, _ptr)

    async def tlsa(self, name: str) -> list[Tlsa]:
        return await self._lookup(name, dns.rdatatype.TLSA, _tlsa, dnssec=True)

    # --- beyond the protocol -----------------------------------------------------------------

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

    # --- the work ----------------------------------------------------------------------------

    async def _lookup(
        self,
        name: str,
        rdtype: dns.rdatatype.RdataType,
        convert: Callable[[dns.rrset.RRset, bool], tuple[T, ...]],
        *,
        dnssec: bool = False,
    ) -> list[T]:
        qname = normalise_name(name, rdtype.name)
        key = (qname, int(rdtype))
        cached = self._cache.get(key)
        if cached is not None:
            self._hits += 1
            entry = cached
        else:
            self._misses += 1
            task = self._inflight.get(key)
            if task is None:
                self._queries += 1
                task = asyncio.get_running_loop().create_task(
                    self._query(qname, rdtype, convert, dnssec)
                )
                self._inflight[key] = task
                task.add_done_callback(partial(self._query_done, key))
            entry, _ttl = await asyncio.shield(task)
        if entry.error is not None:
            raise entry.error(qname[:-1] or ".", rdtype.name, entry.reason)
        return list(cast(tuple[T, ...], entry.values))

    def _query_done(self, key: tuple[str, int], task: asyncio.Task[tuple[_Entry, float]]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if task.cancelled():
            return
        if task.exception() is None:  # marks a bug's exception as retrieved; callers saw it
            entry, ttl = task.result()
            self._cache.put(key, entry, ttl)

    async def _query(
        self,
        qname: str,
        rdtype: dns.rdatatype.RdataType,
        convert: Callable[[dns.rrset.RRset, bool], tuple[T, ...]],
        dnssec: bool,
    ) -> tuple[_Entry, float]:
        """One lookup, as (entry, seconds to cache it). Never raises a DNS failure."""
        resolver = self._dnssec if dnssec else self._plain
        name = dns.name.Name([label.encode("ascii") for label in qname.split(".")])
        try:
            async with asyncio.timeout(self.timeout):
                answer = await resolver.resolve(
                    name, rdtype, raise_on_no_answer=False, lifetime=self.timeout, search=False
                )
        except dns.resolver.NXDOMAIN as exc:
            responses = cast(dict[object, dns.message.Message], exc.kwargs.get("responses", {}))
            response = next(iter(responses.values()), None)
            return _Entry(error=DnsNxDomain, reason="NXDOMAIN"), self._negative(
                _negative_ttl(response)
            )
        except dns.resolver.YXDOMAIN:
            return _Entry(error=DnsNxDomain, reason="YXDOMAIN"), self._negative(0.0)
        except (TimeoutError, dns.exception.Timeout):
            return _Entry(error=DnsTempError, reason=f"timed out after {self.timeout:g}s"), 0.0
        except dns.resolver.NoNameservers as exc:
            return _Entry(error=DnsTempError, reason=_no_nameservers(exc)), 0.0
        except (dns.exception.DNSException, OSError, EOFError) as exc:
            reason = f"{type(exc).__name__}: {exc}"[:200]
            return _Entry(error=DnsTempError, reason=reason), 0.0

        if answer.rrset is None:
            ttl = self._negative(_negative_ttl(answer.response))
            return _Entry(error=DnsNoData, reason="no records of this type (NODATA)"), ttl
        authenticated = bool(answer.response.flags & dns.flags.AD)
        try:
            values = convert(answer.rrset, authenticated)
        except (ValueError, AttributeError) as exc:  # a reply dnspython parsed but we cannot use
            return _Entry(error=DnsTempError, reason=f"unusable answer: {exc}"[:200]), 0.0
        ttl = min(max(answer.chaining_result.minimum_ttl, self.min_ttl), self.max_ttl)
        return _Entry(values=values), ttl

    def _negative(self, ttl: float) -> float:
        return min(max(ttl, self.min_ttl), self.max_negative_ttl)


def _no_nameservers(exc: dns.resolver.NoNameservers) -> str:
    """'SERVFAIL from 127.0.0.1@53; ConnectionRefusedError from ...' out of dnspython's list."""
    parts: list[str] = []
    for error in exc.kwargs.get("errors", []):
        server, problem = str(error[0]).removeprefix("Do53:"), error[3]
        what = problem if isinstance(problem, str) else type(problem).__name__
        parts.append(f"{what} from {server}")
    return "; ".join(dict.fromkeys(parts))[:300] or "no nameserver answered"
